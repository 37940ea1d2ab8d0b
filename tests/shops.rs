//! Several shops on one Redis (issue 15 §13): each worker has its own stream, group and
//! dead-letter stream, and every key derived from them (the lease, the read count, the
//! set of `trimmed` records) is named after them, so two shops never share a lease, a
//! dead letter or a count, and nothing lands under the default names.

use std::collections::BTreeSet;
use std::time::Duration;

use super::util::*;

const T: Duration = Duration::from_secs(30);

struct Shop {
    stream: String,
    group: String,
    sink: Sink,
}

impl Shop {
    fn new(n: u32) -> Shop {
        Shop {
            stream: format!("shop{n}:push:caisse"),
            group: format!("shop{n}-push"),
            // Each shop's plugin refuses the sale named "refused".
            sink: Sink::start(|r| match sale_of(r).as_str() {
                "refused" => Reply::status(422).with_body("unknown account"),
                _ => Reply::status(204),
            }),
        }
    }

    fn dead(&self) -> String {
        format!("{}:dead", self.stream)
    }

    fn publish(&self, conn: &mut redis::Connection, sale: &str, maxlen: usize) -> String {
        redis::cmd("XADD")
            .arg(&self.stream)
            .arg("MAXLEN")
            .arg(maxlen)
            .arg("*")
            .arg("event")
            .arg("pos.ticket.created")
            .arg("payload")
            .arg(ticket(&format!("{}-cs", self.stream), sale))
            .query(conn)
            .unwrap()
    }

    fn worker(&self, redis: &RedisServer) -> Worker {
        Worker::spawn(env_with(
            base_env(redis, &self.sink),
            [
                ("REDIS_STREAM_PUSH_CAISSE", self.stream.as_str()),
                ("PAHEKO_PUSH_GROUP", self.group.as_str()),
            ],
        ))
    }
}

fn keys(conn: &mut redis::Connection) -> BTreeSet<String> {
    redis::cmd("KEYS").arg("*").query(conn).unwrap()
}

#[test]
fn two_shops_on_one_redis_share_nothing() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let shops = [Shop::new(1), Shop::new(2)];
    let mut published = Vec::new();
    for shop in &shops {
        // As the producer sets them up: the group at 0, then a MAXLEN of 10 that trims
        // 2 of the 12 tickets before anyone read them.
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&shop.stream)
            .arg(&shop.group)
            .arg("0")
            .arg("MKSTREAM")
            .query::<()>(&mut conn)
            .unwrap();
        let ids: Vec<String> = (0..12)
            .map(|n| {
                let sale = if n == 5 {
                    "refused".to_owned()
                } else {
                    format!("s{n}")
                };
                shop.publish(&mut conn, &sale, 10)
            })
            .collect();
        published.push(ids);
    }
    let workers: Vec<Worker> = shops.iter().map(|s| s.worker(&redis)).collect();
    for (shop, ids) in shops.iter().zip(&published) {
        wait_until(&format!("{} drained", shop.stream), T, || {
            all_read(&mut conn, &shop.stream, &shop.group)
                && pending_count(&mut conn, &shop.stream, &shop.group) == 0
        });
        let got: BTreeSet<String> = shop.sink.keys().into_iter().collect();
        let expected: BTreeSet<String> = ids[2..].iter().cloned().collect();
        assert_eq!(got, expected, "{} got its own 10 tickets", shop.stream);
        let dead = stream_entries(&mut conn, &shop.dead());
        let reasons: BTreeSet<String> = dead
            .iter()
            .filter_map(|(_, f)| f.iter().find(|(k, _)| k == "reason"))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect();
        assert_eq!(
            reasons,
            BTreeSet::from(["rejected".to_owned(), "trimmed".to_owned()]),
            "{}: {dead:?}",
            shop.dead()
        );
    }
    for worker in &workers {
        wait_until("each shop's worker active", T, || {
            worker.health().1["role"] == "active"
        });
    }
    let expected: BTreeSet<String> = shops
        .iter()
        .flat_map(|s| {
            [
                s.stream.clone(),
                s.dead(),
                format!("{}:trimmed", s.dead()),
                format!("{}:{}:active", s.stream, s.group),
                format!("{}:{}:tenure", s.stream, s.group),
                format!("{}:read:{}", s.stream, s.group),
            ]
        })
        .collect();
    assert_eq!(keys(&mut conn), expected, "nothing under the default names");
}
