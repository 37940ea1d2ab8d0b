//! `.env` variable references (issue 15 §13), as README's Configuration says: `${VAR}`
//! and `$VAR` are substituted, from the file's earlier lines or the real environment,
//! except inside single quotes, which keep a secret holding a `$` as written. (An
//! unbraced name ends at the first character that is not a letter or a digit — `_`
//! included, a quirk of the dotenvy crate — hence `${FROM_ENV}` below.)

use std::collections::HashMap;
use std::time::Duration;

use super::util::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn dotenv_substitutes_variables_except_in_single_quotes() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "SHOP=boutique\n\
         PAHEKO_PUSH_CONSUMER=${SHOP}-${FROM_ENV}\n\
         PAHEKO_PUSH_GROUP=\"$SHOP-push\"\n\
         PAHEKO_PLUGIN_SECRET='pa$$word-$SHOP-${FROM_ENV}'\n",
    )
    .unwrap();
    let env = env_with(
        env_without(
            base_env(&redis, &sink),
            &["PAHEKO_PUSH_CONSUMER", "PAHEKO_PLUGIN_SECRET"],
        ),
        [("FROM_ENV", "one")],
    );
    let worker = Worker::spawn_in(dir.path(), env);
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let received = sink.wait_for_count(1, T);
    assert_eq!(
        received[0].header("x-paheko-secret"),
        Some("pa$$word-$SHOP-${FROM_ENV}"),
        "{}",
        worker.stderr()
    );
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(STREAM)
        .query(&mut conn)
        .unwrap();
    let group: String = redis::from_redis_value_ref(&groups[0]["name"]).unwrap();
    assert_eq!(group, "boutique-push");
    let consumers: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(STREAM)
        .arg(&group)
        .query(&mut conn)
        .unwrap();
    let consumer: String = redis::from_redis_value_ref(&consumers[0]["name"]).unwrap();
    assert_eq!(consumer, "boutique-one");
}
