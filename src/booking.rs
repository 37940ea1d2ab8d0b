//! The booking rule of issue 16 (notes: docs/paheko-api.md), as pure functions over
//! plain data: reading a ticket and a close from their payloads, reconciling a closed
//! session's running totals with what the till says it sold, and the one balanced
//! Paheko entry a session becomes — its lines in cents, its date (the local calendar
//! day of `closed_at` in a configurable time zone), reference, label and notes — or the
//! hold, with its code and figures, that stops anything being booked silently. No I/O
//! and no clock: [`crate::paheko_api`] reads Redis and talks to Paheko around it. The
//! time zone comes from the system's zoneinfo files through a small TZif reader
//! ([`TimeZone`]), with Europe/Paris's rule built in for a machine without tzdata.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Value, json};

/// Why a session (or a ticket) is held instead of booked: the codes of booking.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// `total_sales` / `total_items` of the close differ from what was received.
    TotalsMismatch,
    /// A payment method with no account in `PAHEKO_PUSH_PAYMENT_ACCOUNTS`.
    UnmappedPaymentMethod,
    /// A ticket whose payments do not add up to its total.
    PaymentsMismatch,
    /// No open year of Paheko contains the entry's date (none, or closed).
    NoOpenYear,
    /// An account code missing from the year's chart.
    UnknownAccount,
    /// A ticket for a session already booked.
    AfterClose,
    /// Paheko refused the entry for another reason (its message is in the detail).
    RefusedByPaheko,
    /// A payload the rule cannot read (a field missing or of the wrong type).
    InvalidPayload,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::TotalsMismatch => "totals_mismatch",
            Code::UnmappedPaymentMethod => "unmapped_payment_method",
            Code::PaymentsMismatch => "payments_mismatch",
            Code::NoOpenYear => "no_open_year",
            Code::UnknownAccount => "unknown_account",
            Code::AfterClose => "after_close",
            Code::RefusedByPaheko => "refused_by_paheko",
            Code::InvalidPayload => "invalid_payload",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A hold: the code, and the figures or message a treasurer needs to resolve it.
#[derive(Debug, Clone, PartialEq)]
pub struct Hold {
    pub code: Code,
    /// A JSON object: `expected` / `received` figures, a message, the session.
    pub detail: Value,
}

impl Hold {
    pub fn new(code: Code, detail: Value) -> Hold {
        Hold { code, detail }
    }

    /// The JSON the worker reports for a hold (and the dead letter keeps):
    /// `{"status":"held","code":…, …detail}`.
    pub fn to_json(&self) -> String {
        let mut out = serde_json::Map::new();
        out.insert("status".into(), json!("held"));
        out.insert("code".into(), json!(self.code.as_str()));
        if let Value::Object(detail) = &self.detail {
            for (k, v) in detail {
                out.insert(k.clone(), v.clone());
            }
        }
        Value::Object(out).to_string()
    }
}

/// The accounts the rule books on, by code as Paheko's chart names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accounts {
    /// Payment method → account, in the order configured.
    pub methods: Vec<(String, String)>,
    pub sales: String,
    pub shortage: String,
    pub surplus: String,
}

/// The payment method whose account is the till's cash, where a cash difference goes.
pub const CASH_METHOD: &str = "especes";

impl Default for Accounts {
    fn default() -> Accounts {
        Accounts {
            methods: parse_methods(DEFAULT_PAYMENT_ACCOUNTS).unwrap_or_default(),
            sales: "707".into(),
            shortage: "658".into(),
            surplus: "758".into(),
        }
    }
}

pub const DEFAULT_PAYMENT_ACCOUNTS: &str = "especes:530,cheque:5112,cb:5115,virement:512";

/// Reads `method:account,method:account`; the error says what is wrong, not where
/// (the caller names the variable).
pub fn parse_methods(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((method, account)) = item.split_once(':') else {
            return Err(format!(
                "expected method:account pairs such as {DEFAULT_PAYMENT_ACCOUNTS}, got {item:?}"
            ));
        };
        let (method, account) = (method.trim(), account.trim());
        if method.is_empty() || !is_account_code(account) {
            return Err(format!(
                "expected method:account with an account code of letters and digits, got {item:?}"
            ));
        }
        if out.iter().any(|(m, _)| m == method) {
            return Err(format!("method {method:?} is given twice"));
        }
        out.push((method.to_string(), account.to_string()));
    }
    if out.is_empty() {
        return Err(format!(
            "expected method:account pairs such as {DEFAULT_PAYMENT_ACCOUNTS}"
        ));
    }
    Ok(out)
}

/// An account code as Paheko's charts write them (`530`, `5112`, `411DUPONT`).
pub fn is_account_code(code: &str) -> bool {
    !code.is_empty() && code.len() <= 20 && code.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl Accounts {
    pub fn for_method(&self, method: &str) -> Option<&str> {
        self.methods
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, a)| a.as_str())
    }

    /// Every account code the rule may book on, each once.
    pub fn all_codes(&self) -> Vec<&str> {
        let mut codes: Vec<&str> = self.methods.iter().map(|(_, a)| a.as_str()).collect();
        codes.extend([
            self.sales.as_str(),
            self.shortage.as_str(),
            self.surplus.as_str(),
        ]);
        let mut seen = std::collections::HashSet::new();
        codes.retain(|c| seen.insert(*c));
        codes
    }
}

/// What folding a ticket adds to its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub session_id: String,
    pub total: i64,
    /// Item lines.
    pub items: u64,
    /// Per payment method, the sum of the ticket's payments, in the order first seen.
    pub payments: Vec<(String, i64)>,
}

/// A session's running totals, as folded in Redis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub tickets: u64,
    pub items: u64,
    pub sales: i64,
    pub methods: BTreeMap<String, i64>,
}

/// What the close says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Close {
    pub session_id: String,
    pub closed_at: String,
    pub closing_amount: Option<i64>,
    pub actual_amount: Option<i64>,
    pub variance_comment: Option<String>,
    pub total_sales: Option<i64>,
    pub total_items: Option<u64>,
}

fn invalid(message: String) -> Hold {
    Hold::new(Code::InvalidPayload, json!({ "message": message }))
}

fn object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Hold> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(invalid("the payload is not a JSON object".into())),
        Err(e) => Err(invalid(format!("the payload is not JSON ({e})"))),
    }
}

/// An ID as text: a string, or a number written as one.
fn id_of(o: &serde_json::Map<String, Value>, name: &str) -> Result<String, Hold> {
    match o.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(invalid(format!("{name} is missing or empty"))),
    }
}

/// An amount in cents: an integer (or a float with no fraction, as Python may write).
fn cents(v: &Value, what: &str) -> Result<i64, Hold> {
    if let Some(n) = v.as_i64() {
        return Ok(n);
    }
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => Ok(f as i64),
        _ => Err(invalid(format!(
            "{what} is not a whole number of cents: {v}"
        ))),
    }
}

fn optional_cents(o: &serde_json::Map<String, Value>, name: &str) -> Result<Option<i64>, Hold> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => cents(v, name).map(Some),
    }
}

/// Reads a `pos.ticket.created` payload; a ticket whose payments do not add up to its
/// total is held (`payments_mismatch`), never folded.
pub fn parse_ticket(body: &[u8]) -> Result<Ticket, Hold> {
    let o = object(body)?;
    let session_id = id_of(&o, "cash_session_id")?;
    let sale = o.get("sale_id").cloned().unwrap_or(Value::Null);
    let total = cents(
        o.get("total_amount").unwrap_or(&Value::Null),
        "total_amount",
    )?;
    let items = match o.get("items") {
        None | Some(Value::Null) => 0,
        Some(Value::Array(a)) => a.len() as u64,
        Some(_) => return Err(invalid("items is not a list".into())),
    };
    let mut payments: Vec<(String, i64)> = Vec::new();
    let mut paid = 0i64;
    match o.get("payments") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for p in list {
                let method = match p.get("payment_method") {
                    Some(Value::String(m)) if !m.trim().is_empty() => m.trim().to_string(),
                    _ => return Err(invalid("a payment has no payment_method".into())),
                };
                let amount = cents(p.get("amount").unwrap_or(&Value::Null), "amount")?;
                paid += amount;
                match payments.iter_mut().find(|(m, _)| *m == method) {
                    Some((_, sum)) => *sum += amount,
                    None => payments.push((method, amount)),
                }
            }
        }
        Some(_) => return Err(invalid("payments is not a list".into())),
    }
    if paid != total {
        return Err(Hold::new(
            Code::PaymentsMismatch,
            json!({
                "session_id": session_id,
                "sale_id": sale,
                "expected": { "total_amount": total },
                "received": { "payments": paid, "per_method": payments.iter().cloned().collect::<BTreeMap<_, _>>() },
            }),
        ));
    }
    Ok(Ticket {
        session_id,
        total,
        items,
        payments,
    })
}

/// Reads a `pos.session.closed` payload.
pub fn parse_close(body: &[u8]) -> Result<Close, Hold> {
    let o = object(body)?;
    let text = |name: &str| match o.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => None,
    };
    let total_items = match o.get("total_items") {
        None | Some(Value::Null) => None,
        Some(v) => match cents(v, "total_items")? {
            n if n >= 0 => Some(n as u64),
            n => return Err(invalid(format!("total_items is negative: {n}"))),
        },
    };
    Ok(Close {
        session_id: id_of(&o, "session_id")?,
        closed_at: text("closed_at").ok_or_else(|| invalid("closed_at is missing".into()))?,
        closing_amount: optional_cents(&o, "closing_amount")?,
        actual_amount: optional_cents(&o, "actual_amount")?,
        variance_comment: text("variance_comment"),
        total_sales: optional_cents(&o, "total_sales")?,
        total_items,
    })
}

/// One line of the entry, in cents; exactly one of debit and credit is non-zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub account: String,
    pub debit: i64,
    pub credit: i64,
    pub label: String,
}

/// The entry a session becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub date: Date,
    pub reference: String,
    pub label: String,
    pub notes: String,
    pub lines: Vec<Line>,
}

/// What a closed session becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No sale and no cash difference: nothing to book.
    Nothing,
    Book(Entry),
}

/// The reference of a session's entry, unique per session: what the worker looks up
/// before any POST.
pub fn reference(session_id: &str) -> String {
    format!("RECYCLIQUE-{session_id}")
}

/// Euros for a person: `12,34 €`.
pub fn euros(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let c = cents.unsigned_abs();
    format!("{sign}{},{:02} €", c / 100, c % 100)
}

/// Paheko's API amount: decimal euros as a string, `"12.34"`; never negative (Paheko
/// silently makes a negative amount positive: [`plan`] puts it on the other side).
pub fn api_amount(cents: i64) -> String {
    let c = cents.unsigned_abs();
    format!("{}.{:02}", c / 100, c % 100)
}

/// A line for a signed amount: positive on `debit_side`, negative on the other.
fn line(account: &str, amount: i64, debit_side: bool, label: String) -> Line {
    let (debit, credit) = if (amount > 0) == debit_side {
        (amount.abs(), 0)
    } else {
        (0, amount.abs())
    };
    Line {
        account: account.to_string(),
        debit,
        credit,
        label,
    }
}

/// A session's entry, or why it is held. `register` names the till in the label (the
/// opened event's `register_id`, when it was recorded). `as_received`: the treasurer
/// chose to book what was received despite a totals mismatch; the gap goes in the notes.
pub fn plan(
    close: &Close,
    totals: &Totals,
    register: Option<&str>,
    accounts: &Accounts,
    zone: &TimeZone,
    as_received: bool,
) -> Result<Plan, Hold> {
    let session = close.session_id.as_str();
    let per_method = json!(totals.methods);
    let received = json!({
        "total_sales": totals.sales,
        "total_items": totals.items,
        "tickets": totals.tickets,
        "per_method": per_method,
    });
    let mut gaps = Vec::new();
    if let Some(expected) = close.total_sales
        && expected != totals.sales
    {
        gaps.push(format!(
            "ventes attendues {} , reçues {}",
            euros(expected),
            euros(totals.sales)
        ));
    }
    if let Some(expected) = close.total_items
        && expected != totals.items
    {
        gaps.push(format!(
            "lignes d'articles attendues {expected}, reçues {}",
            totals.items
        ));
    }
    if !gaps.is_empty() && !as_received {
        return Err(Hold::new(
            Code::TotalsMismatch,
            json!({
                "session_id": session,
                "expected": { "total_sales": close.total_sales, "total_items": close.total_items },
                "received": received,
            }),
        ));
    }
    let unmapped: Vec<&str> = totals
        .methods
        .iter()
        .filter(|(m, sum)| **sum != 0 && accounts.for_method(m).is_none())
        .map(|(m, _)| m.as_str())
        .collect();
    let difference = match (close.closing_amount, close.actual_amount) {
        (Some(expected), Some(counted)) => counted - expected,
        _ => 0,
    };
    let cash = accounts.for_method(CASH_METHOD);
    if !unmapped.is_empty() || (difference != 0 && cash.is_none()) {
        let mut methods: Vec<&str> = unmapped;
        if difference != 0 && cash.is_none() {
            methods.push(CASH_METHOD);
        }
        return Err(Hold::new(
            Code::UnmappedPaymentMethod,
            json!({
                "session_id": session,
                "methods": methods,
                "message": "add these methods to PAHEKO_PUSH_PAYMENT_ACCOUNTS, then replay the close",
                "received": received,
            }),
        ));
    }
    let sold = totals.sales != 0 || totals.methods.values().any(|s| *s != 0);
    if !sold && difference == 0 {
        return Ok(Plan::Nothing);
    }
    let date = zone
        .local_date_of(&close.closed_at)
        .map_err(|e| invalid(format!("closed_at: {e}")))?;
    let mut lines = Vec::new();
    for (method, account) in &accounts.methods {
        if let Some(sum) = totals.methods.get(method).filter(|s| **s != 0) {
            lines.push(line(account, *sum, true, format!("Encaissements {method}")));
        }
    }
    if totals.sales != 0 {
        lines.push(line(
            &accounts.sales,
            totals.sales,
            false,
            "Ventes".to_string(),
        ));
    }
    // Counted minus expected: a shortage is a charge paid out of the till's cash, a
    // surplus a product put into it (booking.md).
    if let Some(cash) = cash.filter(|_| difference != 0) {
        let size = difference.abs();
        if difference < 0 {
            lines.push(line(
                &accounts.shortage,
                size,
                true,
                "Écart de caisse (manquant)".into(),
            ));
            lines.push(line(cash, size, false, "Écart de caisse (manquant)".into()));
        } else {
            lines.push(line(cash, size, true, "Écart de caisse (excédent)".into()));
            lines.push(line(
                &accounts.surplus,
                size,
                false,
                "Écart de caisse (excédent)".into(),
            ));
        }
    }
    let till = register
        .filter(|r| !r.trim().is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| session.chars().take(8).collect());
    let mut notes = vec![format!(
        "Session de caisse RecyClique {session} : {} tickets, {} lignes d'articles.",
        totals.tickets, totals.items
    )];
    if difference != 0 {
        notes.push(format!(
            "Écart de caisse : compté {}, attendu {}.",
            euros(close.actual_amount.unwrap_or(0)),
            euros(close.closing_amount.unwrap_or(0))
        ));
    }
    if let Some(comment) = &close.variance_comment {
        notes.push(format!("Commentaire : {comment}"));
    }
    if !gaps.is_empty() {
        notes.push(format!(
            "Comptabilisé tel que reçu malgré un écart avec la clôture : {}.",
            gaps.join(" ; ")
        ));
    }
    Ok(Plan::Book(Entry {
        date,
        reference: reference(session),
        label: format!("RecyClique — caisse {till} du {}", date.french()),
        notes: notes.join("\n"),
        lines,
    }))
}

impl Entry {
    /// True when debits equal credits (always, by construction; checked in tests).
    pub fn balanced(&self) -> bool {
        let debit: i64 = self.lines.iter().map(|l| l.debit).sum();
        let credit: i64 = self.lines.iter().map(|l| l.credit).sum();
        debit == credit
    }

    /// The body of `POST /api/accounting/transaction`: decimal-euro strings, the date
    /// as `YYYY-MM-DD`, the year Paheko finds open for that date.
    pub fn api_body(&self) -> Value {
        let lines: Vec<Value> = self
            .lines
            .iter()
            .map(|l| {
                json!({
                    "account": l.account,
                    "debit": api_amount(l.debit),
                    "credit": api_amount(l.credit),
                    "label": l.label,
                })
            })
            .collect();
        json!({
            "type": "ADVANCED",
            "id_year": "match",
            "date": self.date.to_string(),
            "label": self.label,
            "reference": self.reference,
            "notes": self.notes,
            "lines": lines,
        })
    }
}

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    pub year: i64,
    pub month: u32,
    pub day: u32,
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl Date {
    /// `dd/mm/yyyy`, as a French treasurer reads a date.
    pub fn french(&self) -> String {
        format!("{:02}/{:02}/{:04}", self.day, self.month, self.year)
    }

    /// The day `unix` seconds fall on, in UTC.
    pub fn of_unix(unix: i64) -> Date {
        let (year, month, day) = civil_from_days(unix.div_euclid(86_400));
        Date { year, month, day }
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01 (Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Seconds since the epoch of an ISO 8601 / RFC 3339 time: `2026-11-30T18:05:00Z`,
/// with an offset (`+01:00`, `+0100`), fractional seconds, a space for the `T`, or no
/// offset at all — read as UTC, which is how RecyClique's Python writes a naive
/// `datetime.utcnow()`.
pub fn parse_timestamp(text: &str) -> Result<i64, String> {
    let bad = || format!("{text:?} is not an ISO 8601 time such as 2026-11-30T18:05:00Z");
    let t = text.trim();
    let b = t.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let num = |s: &str| s.parse::<i64>().map_err(|_| bad());
    let (y, mo, d) = (
        num(&t[0..4])?,
        num(&t[5..7])? as u32,
        num(&t[8..10])? as u32,
    );
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) {
        return Err(bad());
    }
    let mut secs = days_from_civil(y, mo, d) * 86_400;
    let rest = &t[10..];
    if rest.is_empty() {
        return Ok(secs);
    }
    let rest = rest.strip_prefix(['T', 't', ' ']).ok_or_else(bad)?;
    if rest.len() < 5 || rest.as_bytes()[2] != b':' {
        return Err(bad());
    }
    let (h, mi) = (num(&rest[0..2])?, num(&rest[3..5])?);
    let mut rest = &rest[5..];
    let mut s = 0;
    if let Some(r) = rest.strip_prefix(':') {
        if r.len() < 2 {
            return Err(bad());
        }
        s = num(&r[0..2])?;
        rest = &r[2..];
        if let Some(r) = rest.strip_prefix(['.', ',']) {
            let digits = r.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            rest = &r[digits..];
        }
    }
    if h > 23 || mi > 59 || s > 60 {
        return Err(bad());
    }
    secs += h * 3600 + mi * 60 + s;
    let offset = match rest {
        "" | "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return Err(bad()),
            };
            let digits: String = rest[1..].chars().filter(|c| *c != ':').collect();
            if !(digits.len() == 2 || digits.len() == 4)
                || !digits.bytes().all(|c| c.is_ascii_digit())
            {
                return Err(bad());
            }
            let oh = num(&digits[0..2])?;
            let om = if digits.len() == 4 {
                num(&digits[2..4])?
            } else {
                0
            };
            sign * (oh * 3600 + om * 60)
        }
    };
    Ok(secs - offset)
}

/// A time zone: the UTC offset at any instant. From a TZif file of the system's
/// zoneinfo (its transitions, then the POSIX rule of its footer for later times), or
/// from a POSIX TZ rule string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeZone {
    pub name: String,
    /// Transition instants and the offset in force from each, ascending.
    transitions: Vec<(i64, i32)>,
    /// The offset before the first transition.
    initial: i32,
    /// The rule after the last transition (or for all time, with no transitions).
    rule: Option<Rule>,
}

/// Europe/Paris's rule since 1996, used when the machine has no zoneinfo files.
pub const PARIS_RULE: &str = "CET-1CEST,M3.5.0,M10.5.0/3";
pub const DEFAULT_TIMEZONE: &str = "Europe/Paris";
const ZONEINFO: &str = "/usr/share/zoneinfo";

impl TimeZone {
    /// `name` as an IANA zone under `/usr/share/zoneinfo` (Europe/Paris,
    /// Indian/Reunion…), `UTC`, or a POSIX TZ rule (`CET-1CEST,M3.5.0,M10.5.0/3`).
    pub fn named(name: &str) -> Result<TimeZone, String> {
        Self::named_in(name, std::path::Path::new(ZONEINFO))
    }

    pub fn named_in(name: &str, zoneinfo: &std::path::Path) -> Result<TimeZone, String> {
        let name = name.trim();
        if name.is_empty() {
            return Err("expected a time zone such as Europe/Paris".into());
        }
        if name.eq_ignore_ascii_case("UTC") {
            return TimeZone::from_rule(name, "UTC0");
        }
        let is_path = name
            .split('/')
            .all(|part| !part.is_empty() && part != ".." && part != ".")
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_-+".contains(&b))
            && name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic());
        if is_path {
            match std::fs::read(zoneinfo.join(name)) {
                Ok(data) => {
                    return TimeZone::from_tzif(name, &data)
                        .map_err(|e| format!("{}/{name}: {e}", zoneinfo.display()));
                }
                Err(_) if name == DEFAULT_TIMEZONE => {
                    return TimeZone::from_rule(name, PARIS_RULE);
                }
                Err(e) if !name.bytes().any(|b| b.is_ascii_digit()) => {
                    return Err(format!(
                        "no time zone {name:?} in {} ({e}); install the tzdata package, or give a POSIX TZ rule such as {PARIS_RULE}",
                        zoneinfo.display()
                    ));
                }
                Err(_) => {}
            }
        }
        TimeZone::from_rule(name, name).map_err(|e| {
            format!(
                "{name:?} is neither a zone of {} nor a POSIX TZ rule ({e})",
                zoneinfo.display()
            )
        })
    }

    pub fn from_rule(name: &str, rule: &str) -> Result<TimeZone, String> {
        let rule = Rule::parse(rule)?;
        Ok(TimeZone {
            name: name.to_string(),
            transitions: Vec::new(),
            initial: rule.std,
            rule: Some(rule),
        })
    }

    /// Reads a TZif file (RFC 8536), versions 1 to 4: the 64-bit data block when there
    /// is one, and the footer's rule.
    pub fn from_tzif(name: &str, data: &[u8]) -> Result<TimeZone, String> {
        let header = |at: usize| -> Result<[usize; 6], String> {
            let h = data.get(at..at + 44).ok_or("truncated TZif header")?;
            if &h[0..4] != b"TZif" {
                return Err("not a TZif file".into());
            }
            let mut counts = [0usize; 6];
            for (i, c) in counts.iter_mut().enumerate() {
                let o = 20 + 4 * i;
                *c = u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]) as usize;
            }
            Ok(counts)
        };
        // isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt
        let v1 = header(0)?;
        let version = data[4];
        let v1_len = |c: [usize; 6], time: usize| {
            c[3] * time + c[3] + c[4] * 6 + c[5] + c[2] * (time + 4) + c[1] + c[0]
        };
        let (start, counts, time) = if version >= b'2' {
            let second = 44 + v1_len(v1, 4);
            (second, header(second)?, 8)
        } else {
            (0, v1, 4)
        };
        let [_, _, _, timecnt, typecnt, _] = counts;
        let mut at = start + 44;
        let need = v1_len(counts, time);
        if data.len() < at + need || typecnt == 0 {
            return Err("truncated TZif data".into());
        }
        let mut times = Vec::with_capacity(timecnt);
        for i in 0..timecnt {
            let o = at + i * time;
            times.push(if time == 8 {
                i64::from_be_bytes(data[o..o + 8].try_into().map_err(|_| "bad time")?)
            } else {
                i32::from_be_bytes(data[o..o + 4].try_into().map_err(|_| "bad time")?) as i64
            });
        }
        at += timecnt * time;
        let indices = &data[at..at + timecnt];
        at += timecnt;
        let mut offsets = Vec::with_capacity(typecnt);
        for i in 0..typecnt {
            let o = at + i * 6;
            offsets.push(i32::from_be_bytes(
                data[o..o + 4].try_into().map_err(|_| "bad type")?,
            ));
        }
        let mut transitions = Vec::with_capacity(timecnt);
        for (t, i) in times.into_iter().zip(indices) {
            let offset = *offsets
                .get(*i as usize)
                .ok_or("a transition names a type that does not exist")?;
            transitions.push((t, offset));
        }
        let rule = if version >= b'2' {
            let footer = &data[start + 44 + need..];
            let text = std::str::from_utf8(footer).map_err(|_| "footer not UTF-8")?;
            let text = text.trim_matches('\n');
            (!text.is_empty()).then(|| Rule::parse(text)).transpose()?
        } else {
            None
        };
        Ok(TimeZone {
            name: name.to_string(),
            transitions,
            initial: offsets[0],
            rule,
        })
    }

    /// The offset from UTC, in seconds, at `unix`.
    pub fn offset_at(&self, unix: i64) -> i32 {
        let after = self.transitions.partition_point(|(t, _)| *t <= unix);
        match (after, &self.rule) {
            (n, Some(rule)) if n == self.transitions.len() => rule.offset_at(unix),
            (0, _) => self.initial,
            (n, _) => self.transitions[n - 1].1,
        }
    }

    /// The local calendar day of an ISO 8601 time.
    pub fn local_date_of(&self, timestamp: &str) -> Result<Date, String> {
        let unix = parse_timestamp(timestamp)?;
        Ok(Date::of_unix(unix + self.offset_at(unix) as i64))
    }
}

/// A POSIX TZ rule (`std offset [dst [offset] [,start[/time],end[/time]]]`) with
/// `Mm.w.d` dates, the form every TZif footer of the IANA database uses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// UTC offsets, seconds east.
    std: i32,
    dst: Option<(i32, RuleDate, RuleDate)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RuleDate {
    month: u32,
    week: u32,
    weekday: u32,
    /// Local time of the change, seconds (may be negative or past 24 h).
    time: i32,
}

impl Rule {
    fn parse(text: &str) -> Result<Rule, String> {
        let mut s = text;
        skip_name(&mut s)?;
        let std = -posix_offset(&mut s)?;
        if s.is_empty() {
            return Ok(Rule { std, dst: None });
        }
        skip_name(&mut s)?;
        let dst = if s.starts_with(',') || s.is_empty() {
            std + 3600
        } else {
            -posix_offset(&mut s)?
        };
        let Some(rest) = s.strip_prefix(',') else {
            return Err(format!("{text:?}: a daylight-saving rule needs its dates"));
        };
        let (start, end) = rest
            .split_once(',')
            .ok_or_else(|| format!("{text:?}: expected ,start,end"))?;
        Ok(Rule {
            std,
            dst: Some((dst, rule_date(start)?, rule_date(end)?)),
        })
    }

    fn offset_at(&self, unix: i64) -> i32 {
        let Some((dst, start, end)) = self.dst else {
            return self.std;
        };
        let year = Date::of_unix(unix + self.std as i64).year;
        // Both changes, in UTC: the start is given in standard time, the end in
        // daylight time.
        let starts = start.unix_in(year) - self.std as i64;
        let ends = end.unix_in(year) - dst as i64;
        let in_dst = if starts < ends {
            unix >= starts && unix < ends
        } else {
            // Southern hemisphere: daylight time spans the new year.
            unix >= starts || unix < ends
        };
        if in_dst { dst } else { self.std }
    }
}

impl RuleDate {
    /// The local instant of this change in `year`, as seconds since the epoch.
    fn unix_in(&self, year: i64) -> i64 {
        let first = days_from_civil(year, self.month, 1);
        // 1970-01-01 was a Thursday (weekday 4).
        let first_weekday = (first + 4).rem_euclid(7) as u32;
        let mut day = 1 + (self.weekday + 7 - first_weekday) % 7 + 7 * (self.week - 1);
        if self.week == 5 {
            while day > days_in_month(year, self.month) {
                day -= 7;
            }
        }
        days_from_civil(year, self.month, day) * 86_400 + self.time as i64
    }
}

fn skip_name(s: &mut &str) -> Result<(), String> {
    if let Some(rest) = s.strip_prefix('<') {
        let end = rest.find('>').ok_or("unclosed < in a zone name")?;
        *s = &rest[end + 1..];
        return Ok(());
    }
    let n = s.bytes().take_while(u8::is_ascii_alphabetic).count();
    if n < 3 {
        return Err(format!("expected a zone abbreviation at {s:?}"));
    }
    *s = &s[n..];
    Ok(())
}

/// `[+-]hh[:mm[:ss]]`, as written (POSIX: positive west of Greenwich).
fn posix_offset(s: &mut &str) -> Result<i32, String> {
    let n = s
        .bytes()
        .take_while(|b| b.is_ascii_digit() || b"+-:".contains(b))
        .count();
    let (text, rest) = s.split_at(n);
    *s = rest;
    hms(text)
}

fn hms(text: &str) -> Result<i32, String> {
    let (sign, body) = match text.as_bytes().first() {
        Some(b'-') => (-1, &text[1..]),
        Some(b'+') => (1, &text[1..]),
        _ => (1, text),
    };
    let mut total = 0i32;
    let mut parts = 0;
    for (i, part) in body.split(':').enumerate() {
        let v: i32 = part
            .parse()
            .map_err(|_| format!("expected hh[:mm[:ss]], got {text:?}"))?;
        total += v * [3600, 60, 1].get(i).ok_or("too many : in a time")?;
        parts += 1;
    }
    if parts == 0 {
        return Err(format!("expected an offset, got {text:?}"));
    }
    Ok(sign * total)
}

fn rule_date(text: &str) -> Result<RuleDate, String> {
    let (date, time) = match text.split_once('/') {
        Some((d, t)) => (d, hms(t)?),
        None => (text, 7200),
    };
    let unsupported = || format!("only Mm.w.d rule dates are supported, got {text:?}");
    let spec = date.strip_prefix('M').ok_or_else(unsupported)?;
    let parts: Vec<u32> = spec
        .split('.')
        .map(|p| p.parse().map_err(|_| unsupported()))
        .collect::<Result<_, _>>()?;
    match parts[..] {
        [month @ 1..=12, week @ 1..=5, weekday @ 0..=6] => Ok(RuleDate {
            month,
            week,
            weekday,
            time,
        }),
        _ => Err(unsupported()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paris() -> TimeZone {
        TimeZone::from_rule("Europe/Paris", PARIS_RULE).unwrap()
    }

    fn unix(text: &str) -> i64 {
        parse_timestamp(text).unwrap()
    }

    fn close(sales: Option<i64>, items: Option<u64>) -> Close {
        Close {
            session_id: "5f2c-aaaa-bbbb".into(),
            closed_at: "2026-11-30T17:30:00Z".into(),
            total_sales: sales,
            total_items: items,
            ..Close::default()
        }
    }

    fn totals(pairs: &[(&str, i64)], items: u64) -> Totals {
        Totals {
            tickets: pairs.len() as u64,
            items,
            sales: pairs.iter().map(|(_, a)| a).sum(),
            methods: pairs.iter().fold(BTreeMap::new(), |mut m, (k, v)| {
                *m.entry(k.to_string()).or_default() += v;
                m
            }),
        }
    }

    fn entry(p: Result<Plan, Hold>) -> Entry {
        match p {
            Ok(Plan::Book(e)) => e,
            other => panic!("expected an entry, got {other:?}"),
        }
    }

    fn lines(e: &Entry) -> Vec<(&str, i64, i64)> {
        e.lines
            .iter()
            .map(|l| (l.account.as_str(), l.debit, l.credit))
            .collect()
    }

    #[test]
    fn timestamps_in_every_form_the_producer_may_write() {
        let z = unix("2026-11-30T17:30:00Z");
        assert_eq!(z, 1_796_059_800);
        for t in [
            "2026-11-30T17:30:00",
            "2026-11-30 17:30:00",
            "2026-11-30T17:30:00.123456",
            "2026-11-30T17:30:00.5Z",
            "2026-11-30T18:30:00+01:00",
            "2026-11-30T18:30:00+0100",
            "2026-11-30T16:30:00-01",
            "2026-11-30T17:30Z",
        ] {
            assert_eq!(unix(t), z, "{t}");
        }
        assert_eq!(unix("1970-01-01"), 0);
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-30T25:00:00Z",
            "2026-11-30T17:30:00 CET",
            "2026-11-30T17:30:00+1",
            "2026-11-30X17:30:00",
        ] {
            assert!(parse_timestamp(bad).is_err(), "{bad:?}");
        }
        assert!(parse_timestamp("2024-02-29T00:00:00Z").is_ok());
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-800_000, -1, 0, 1, 11_016, 19_000, 20_422, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(Date::of_unix(0).to_string(), "1970-01-01");
        assert_eq!(Date::of_unix(-1).to_string(), "1969-12-31");
        assert_eq!(
            Date::of_unix(unix("2024-02-29T23:59:59Z")).french(),
            "29/02/2024"
        );
    }

    /// Europe/Paris changes at 01:00 UTC on the last Sunday of March and of October.
    #[test]
    fn paris_daylight_saving_edges() {
        let z = paris();
        // 2026: 29 March and 25 October.
        assert_eq!(z.offset_at(unix("2026-03-29T00:59:59Z")), 3600);
        assert_eq!(z.offset_at(unix("2026-03-29T01:00:00Z")), 7200);
        assert_eq!(z.offset_at(unix("2026-10-25T00:59:59Z")), 7200);
        assert_eq!(z.offset_at(unix("2026-10-25T01:00:00Z")), 3600);
        // 2027: 28 March and 31 October (the 5th Sunday is the last one).
        assert_eq!(z.offset_at(unix("2027-03-28T00:59:59Z")), 3600);
        assert_eq!(z.offset_at(unix("2027-03-28T01:00:00Z")), 7200);
        assert_eq!(z.offset_at(unix("2027-10-31T00:59:59Z")), 7200);
        assert_eq!(z.offset_at(unix("2027-10-31T01:00:00Z")), 3600);
        assert_eq!(z.offset_at(unix("2026-07-14T12:00:00Z")), 7200);
        assert_eq!(z.offset_at(unix("2026-01-01T12:00:00Z")), 3600);
    }

    #[test]
    fn the_local_day_of_a_late_close() {
        let z = paris();
        let day = |t: &str| z.local_date_of(t).unwrap().to_string();
        // Summer: 22:30 UTC is 00:30 the next day in Paris; winter: 23:30 UTC is.
        assert_eq!(day("2026-07-14T21:59:59Z"), "2026-07-14");
        assert_eq!(day("2026-07-14T22:00:00Z"), "2026-07-15");
        assert_eq!(day("2026-12-31T22:59:59Z"), "2026-12-31");
        assert_eq!(day("2026-12-31T23:00:00Z"), "2027-01-01");
        assert_eq!(day("2027-01-01T00:30:00+01:00"), "2027-01-01");
        // The night of the October change, either side of it.
        assert_eq!(day("2026-10-24T21:59:59Z"), "2026-10-24");
        assert_eq!(day("2026-10-24T22:00:00Z"), "2026-10-25");
        let utc = TimeZone::named("UTC").unwrap();
        assert_eq!(
            utc.local_date_of("2026-07-14T22:00:00Z")
                .unwrap()
                .to_string(),
            "2026-07-14"
        );
    }

    #[test]
    fn southern_and_fixed_rules() {
        // Pacific/Auckland: daylight time from the last Sunday of September to the
        // first Sunday of April, across the new year.
        let z = TimeZone::from_rule("NZ", "NZST-12NZDT,M9.5.0,M4.1.0/3").unwrap();
        assert_eq!(z.offset_at(unix("2026-01-15T00:00:00Z")), 13 * 3600);
        assert_eq!(z.offset_at(unix("2026-06-15T00:00:00Z")), 12 * 3600);
        // 5 April 2026 03:00 NZDT = 4 April 14:00 UTC.
        assert_eq!(z.offset_at(unix("2026-04-04T13:59:59Z")), 13 * 3600);
        assert_eq!(z.offset_at(unix("2026-04-04T14:00:00Z")), 12 * 3600);
        let reunion = TimeZone::from_rule("Indian/Reunion", "<+04>-4").unwrap();
        assert_eq!(reunion.offset_at(0), 4 * 3600);
        assert_eq!(
            reunion
                .local_date_of("2026-07-14T20:00:00Z")
                .unwrap()
                .to_string(),
            "2026-07-15"
        );
        let martinique = TimeZone::from_rule("America/Martinique", "AST4").unwrap();
        assert_eq!(martinique.offset_at(0), -4 * 3600);
        for bad in [
            "",
            "C",
            "CET",
            "CET-1CEST",
            "CET-1CEST,J60,J300",
            "CET-1CEST,M13.5.0,M10.5.0",
        ] {
            assert!(TimeZone::from_rule(bad, bad).is_err(), "{bad:?}");
        }
    }

    /// The system's file and the built-in rule agree, before and past the file's last
    /// transition (the footer's rule takes over there).
    #[test]
    fn the_zoneinfo_file_agrees_with_the_rule() {
        let path = std::path::Path::new(ZONEINFO).join("Europe/Paris");
        let Ok(data) = std::fs::read(&path) else {
            // scripts/test installs tzdata (a dependency of php8.2-common).
            let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"));
            assert!(
                !ci,
                "under CI nothing may be skipped: no {}",
                path.display()
            );
            eprintln!("skipped: no {}", path.display());
            return;
        };
        let file = TimeZone::from_tzif("Europe/Paris", &data).unwrap();
        let rule = paris();
        let mut t = unix("1997-01-01T00:00:00Z");
        let end = unix("2045-01-01T00:00:00Z");
        while t < end {
            assert_eq!(file.offset_at(t), rule.offset_at(t), "at {t}");
            t += 3 * 3600 + 1234;
        }
        // Before 1996 the rule differed (September ends), and the file knows it.
        assert_eq!(file.offset_at(unix("1990-10-15T12:00:00Z")), 3600);
        assert_eq!(rule.offset_at(unix("1990-10-15T12:00:00Z")), 7200);
        let named = TimeZone::named("Europe/Paris").unwrap();
        assert_eq!(named, file);
        let e = TimeZone::named("Europe/Atlantis").unwrap_err();
        assert!(e.contains("tzdata"), "{e}");
        assert!(TimeZone::named("../etc/passwd").is_err());
    }

    #[test]
    fn paris_is_known_without_tzdata() {
        let empty = std::env::temp_dir().join("paheko-push-no-zoneinfo");
        let z = TimeZone::named_in("Europe/Paris", &empty).unwrap();
        assert_eq!(z, paris());
        assert!(TimeZone::named_in("Europe/Brussels", &empty).is_err());
        let rule = TimeZone::named_in(PARIS_RULE, &empty).unwrap();
        assert_eq!(rule.offset_at(unix("2026-07-14T12:00:00Z")), 7200);
    }

    #[test]
    fn a_ticket_is_read_and_its_payments_checked() {
        let t = parse_ticket(
            br#"{"sale_id":"s1","cash_session_id":"S","total_amount":1500,"items":[{"id":1,"weight":2.5},{"id":2,"weight":null}],
                "payments":[{"payment_method":"especes","amount":1000},{"payment_method":"cb","amount":300},{"payment_method":"especes","amount":200}]}"#,
        )
        .unwrap();
        assert_eq!(t.session_id, "S");
        assert_eq!((t.total, t.items), (1500, 2));
        assert_eq!(t.payments, [("especes".into(), 1200), ("cb".into(), 300)]);
        let h = parse_ticket(
            br#"{"sale_id":"s2","cash_session_id":"S","total_amount":1500,"items":[],"payments":[{"payment_method":"cb","amount":1400}]}"#,
        )
        .unwrap_err();
        assert_eq!(h.code, Code::PaymentsMismatch);
        assert_eq!(h.detail["expected"]["total_amount"], 1500);
        assert_eq!(h.detail["received"]["payments"], 1400);
        assert_eq!(h.detail["sale_id"], "s2");
        // A float with no fraction, as Python may write it, is cents all the same.
        let t = parse_ticket(br#"{"cash_session_id":7,"total_amount":250.0,"payments":[{"payment_method":"cheque","amount":250}]}"#).unwrap();
        assert_eq!((t.session_id.as_str(), t.total), ("7", 250));
        for bad in [
            &b"not json"[..],
            br#"[1]"#,
            br#"{"total_amount":1}"#,
            br#"{"cash_session_id":"S","total_amount":12.5}"#,
            br#"{"cash_session_id":"S","total_amount":1,"payments":[{"amount":1}]}"#,
        ] {
            assert_eq!(parse_ticket(bad).unwrap_err().code, Code::InvalidPayload);
        }
    }

    #[test]
    fn a_close_is_read() {
        let c = parse_close(
            br#"{"session_id":"S","closed_at":"2026-11-30T17:30:00Z","closing_amount":5000,"actual_amount":4950,
                "variance_comment":"piece perdue","total_sales":12000,"total_items":14}"#,
        )
        .unwrap();
        assert_eq!(
            (
                c.closing_amount,
                c.actual_amount,
                c.total_sales,
                c.total_items
            ),
            (Some(5000), Some(4950), Some(12000), Some(14))
        );
        assert_eq!(c.variance_comment.as_deref(), Some("piece perdue"));
        let c = parse_close(
            br#"{"session_id":"S","closed_at":"2026-11-30T17:30:00Z","total_sales":null}"#,
        )
        .unwrap();
        assert_eq!(c.total_sales, None);
        assert_eq!(
            parse_close(br#"{"session_id":"S"}"#).unwrap_err().code,
            Code::InvalidPayload
        );
    }

    #[test]
    fn one_balanced_entry_per_session() {
        let t = totals(
            &[
                ("especes", 1200),
                ("cb", 850),
                ("especes", 300),
                ("cheque", 2000),
            ],
            6,
        );
        let e = entry(plan(
            &close(Some(4350), Some(6)),
            &t,
            Some("caisse-2"),
            &Accounts::default(),
            &paris(),
            false,
        ));
        assert_eq!(
            lines(&e),
            [
                ("530", 1500, 0),
                ("5112", 2000, 0),
                ("5115", 850, 0),
                ("707", 0, 4350)
            ]
        );
        assert!(e.balanced());
        assert_eq!(e.reference, "RECYCLIQUE-5f2c-aaaa-bbbb");
        assert_eq!(e.label, "RecyClique — caisse caisse-2 du 30/11/2026");
        assert_eq!(e.date.to_string(), "2026-11-30");
        let body = e.api_body();
        assert_eq!(body["type"], "ADVANCED");
        assert_eq!(body["id_year"], "match");
        assert_eq!(body["date"], "2026-11-30");
        assert_eq!(body["lines"][0]["debit"], "15.00");
        assert_eq!(body["lines"][0]["credit"], "0.00");
        assert_eq!(body["lines"][3]["credit"], "43.50");
        // Without a register, the session's first characters name the till.
        let e = entry(plan(
            &close(None, None),
            &t,
            None,
            &Accounts::default(),
            &paris(),
            false,
        ));
        assert_eq!(e.label, "RecyClique — caisse 5f2c-aaa du 30/11/2026");
    }

    #[test]
    fn zero_sums_are_omitted_and_refunds_change_sides() {
        let t = totals(
            &[
                ("especes", 1000),
                ("cb", 500),
                ("cb", -500),
                ("especes", -1600),
            ],
            0,
        );
        let e = entry(plan(
            &close(None, None),
            &t,
            None,
            &Accounts::default(),
            &paris(),
            false,
        ));
        // Refunds beyond sales: cash goes out (credit 530) and sales are debited.
        assert_eq!(lines(&e), [("530", 0, 600), ("707", 600, 0)]);
        assert!(e.balanced());
        for l in e.api_body()["lines"].as_array().unwrap() {
            for side in ["debit", "credit"] {
                assert!(!l[side].as_str().unwrap().starts_with('-'), "{l}");
            }
        }
    }

    #[test]
    fn cash_differences() {
        let t = totals(&[("especes", 3000)], 2);
        let mut c = close(Some(3000), Some(2));
        c.closing_amount = Some(8000);
        c.actual_amount = Some(7950);
        c.variance_comment = Some("rendu de monnaie".into());
        let e = entry(plan(&c, &t, None, &Accounts::default(), &paris(), false));
        assert_eq!(
            lines(&e),
            [
                ("530", 3000, 0),
                ("707", 0, 3000),
                ("658", 50, 0),
                ("530", 0, 50)
            ]
        );
        assert!(e.balanced());
        assert!(
            e.notes.contains("79,50 €") && e.notes.contains("rendu de monnaie"),
            "{}",
            e.notes
        );
        c.actual_amount = Some(8120);
        let e = entry(plan(&c, &t, None, &Accounts::default(), &paris(), false));
        assert_eq!(
            lines(&e),
            [
                ("530", 3000, 0),
                ("707", 0, 3000),
                ("530", 120, 0),
                ("758", 0, 120)
            ]
        );
        // No sale, only a difference: booked all the same.
        c.total_sales = None;
        c.total_items = None;
        let e = entry(plan(
            &c,
            &Totals::default(),
            None,
            &Accounts::default(),
            &paris(),
            false,
        ));
        assert_eq!(lines(&e), [("530", 120, 0), ("758", 0, 120)]);
        // Only one of the two amounts: no difference to book.
        c.closing_amount = None;
        assert_eq!(
            plan(
                &c,
                &Totals::default(),
                None,
                &Accounts::default(),
                &paris(),
                false
            ),
            Ok(Plan::Nothing)
        );
    }

    #[test]
    fn nothing_sold_books_nothing() {
        assert_eq!(
            plan(
                &close(Some(0), Some(0)),
                &Totals::default(),
                None,
                &Accounts::default(),
                &paris(),
                false
            ),
            Ok(Plan::Nothing)
        );
        // Free donations: item lines at 0 €, still nothing to book.
        let t = Totals {
            items: 3,
            tickets: 2,
            ..Totals::default()
        };
        assert_eq!(
            plan(
                &close(Some(0), Some(3)),
                &t,
                None,
                &Accounts::default(),
                &paris(),
                false
            ),
            Ok(Plan::Nothing)
        );
    }

    #[test]
    fn a_mismatch_is_held_with_both_figures_and_can_be_booked_as_received() {
        let t = totals(&[("especes", 1000), ("cb", 250)], 3);
        for c in [
            close(Some(1500), Some(3)),
            close(Some(1250), Some(4)),
            close(Some(1), None),
            close(None, Some(2)),
        ] {
            let h = plan(&c, &t, None, &Accounts::default(), &paris(), false).unwrap_err();
            assert_eq!(h.code, Code::TotalsMismatch, "{c:?}");
            assert_eq!(h.detail["received"]["total_sales"], 1250);
            assert_eq!(h.detail["received"]["total_items"], 3);
            assert_eq!(h.detail["received"]["per_method"]["cb"], 250);
            assert_eq!(h.detail["expected"]["total_sales"], json!(c.total_sales));
            let j: Value = serde_json::from_str(&h.to_json()).unwrap();
            assert_eq!(
                (j["status"].as_str(), j["code"].as_str()),
                (Some("held"), Some("totals_mismatch"))
            );
        }
        let e = entry(plan(
            &close(Some(1500), Some(4)),
            &t,
            None,
            &Accounts::default(),
            &paris(),
            true,
        ));
        assert_eq!(
            lines(&e),
            [("530", 1000, 0), ("5115", 250, 0), ("707", 0, 1250)]
        );
        assert!(
            e.notes.contains("15,00 €") && e.notes.contains("12,50 €"),
            "{}",
            e.notes
        );
        assert!(e.notes.contains("attendues 4, reçues 3"), "{}", e.notes);
        // Matching totals leave no gap in the notes.
        let e = entry(plan(
            &close(Some(1250), Some(3)),
            &t,
            None,
            &Accounts::default(),
            &paris(),
            true,
        ));
        assert!(!e.notes.contains("tel que reçu"), "{}", e.notes);
    }

    #[test]
    fn an_unmapped_method_is_held_never_booked_on_a_default() {
        let t = totals(&[("especes", 1000), ("bon_achat", 500)], 2);
        let h = plan(
            &close(None, None),
            &t,
            None,
            &Accounts::default(),
            &paris(),
            false,
        )
        .unwrap_err();
        assert_eq!(h.code, Code::UnmappedPaymentMethod);
        assert_eq!(h.detail["methods"], json!(["bon_achat"]));
        // Booking as received does not book on a default account either.
        let h = plan(
            &close(None, None),
            &t,
            None,
            &Accounts::default(),
            &paris(),
            true,
        )
        .unwrap_err();
        assert_eq!(h.code, Code::UnmappedPaymentMethod);
        // A difference needs the cash account.
        let accounts = Accounts {
            methods: vec![("cb".into(), "5115".into())],
            ..Accounts::default()
        };
        let mut c = close(None, None);
        c.closing_amount = Some(10);
        c.actual_amount = Some(0);
        let h = plan(&c, &Totals::default(), None, &accounts, &paris(), false).unwrap_err();
        assert_eq!(h.detail["methods"], json!(["especes"]));
        // A method whose sum is zero has no line and needs no account.
        let t = totals(&[("especes", 1000), ("bon_achat", 0)], 1);
        assert!(
            plan(
                &close(None, None),
                &t,
                None,
                &Accounts::default(),
                &paris(),
                false
            )
            .is_ok()
        );
    }

    #[test]
    fn a_bad_closed_at_is_an_invalid_payload() {
        let mut c = close(None, None);
        c.closed_at = "demain".into();
        let h = plan(
            &c,
            &totals(&[("cb", 1)], 1),
            None,
            &Accounts::default(),
            &paris(),
            false,
        )
        .unwrap_err();
        assert_eq!(h.code, Code::InvalidPayload);
    }

    #[test]
    fn method_lists() {
        let m = parse_methods(" especes:530 , cb:5115,").unwrap();
        assert_eq!(
            m,
            [
                ("especes".into(), "530".into()),
                ("cb".into(), "5115".into())
            ]
        );
        for bad in [
            "",
            "especes",
            "especes:",
            ":530",
            "especes:5 30",
            "cb:1,cb:2",
        ] {
            assert!(parse_methods(bad).is_err(), "{bad:?}");
        }
        let a = Accounts::default();
        assert_eq!(
            a.all_codes(),
            ["530", "5112", "5115", "512", "707", "658", "758"]
        );
    }

    #[test]
    fn amounts_for_people_and_for_the_api() {
        assert_eq!(api_amount(1234), "12.34");
        assert_eq!(api_amount(5), "0.05");
        assert_eq!(api_amount(-1234), "12.34");
        assert_eq!(api_amount(10_000_000), "100000.00");
        assert_eq!(euros(-1234), "-12,34 €");
        assert_eq!(euros(7), "0,07 €");
    }
}
