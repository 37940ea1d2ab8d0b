//! The `recyclique` plugin (plugin/recyclique/) inside a real Paheko 1.3.22.1 served by
//! php-fpm behind nginx (tests/util/paheko.rs), issue 16 §1 and §3: the ledger is always
//! read through Paheko's own REST API, never from the plugin's tables.

use super::util::*;

#[test]
fn paheko_boots_with_an_open_year_on_the_associations_chart() {
    let Some(paheko) = Paheko::start() else {
        return;
    };
    let years = paheko.api_json("accounting/years");
    let years = years.as_array().expect("a list of years");
    assert_eq!(years.len(), 1, "one year: {years:?}");
    assert_eq!(years[0]["status"], 0, "the year is open: {years:?}");
    let today = paheko.sql("SELECT date('now') AS d")[0]["d"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(paheko.year_id(&today).is_some(), "the year covers {today}");
    let codes: Vec<String> = paheko
        .sql(
            "SELECT a.code FROM acc_accounts a JOIN acc_charts c ON c.id = a.id_chart \
             WHERE c.country = 'FR' AND c.code = 'PCA_2025' \
             AND a.code IN ('530','5112','5115','512','707','658','758') ORDER BY a.code",
        )
        .iter()
        .map(|r| r["code"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        codes,
        ["5112", "5115", "512", "530", "658", "707", "758"],
        "the booking rule's accounts exist in fr_pca_2025"
    );
    assert!(paheko.all_entries().is_empty(), "a fresh ledger is empty");
    let (status, _) = paheko.api_get("accounting/years");
    assert_eq!(status, 200);
}
