//! Signed requests, after Standard Webhooks v1 (<https://www.standardwebhooks.com/>):
//! the plugin learns that a request comes from this worker, and that its body was not
//! changed on the way, without the secret ever travelling. Three headers carry it:
//! `webhook-id` (the stream entry ID), `webhook-timestamp` (unix seconds) and
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`. The key
//! is the base64-decoded part of a `whsec_…` secret, or the secret's own bytes
//! otherwise. This module only computes and checks signatures; the pusher decides when
//! to send them ([`crate::config::Auth`]) and `docs/plugin-contract.md` tells the
//! plugin's author how to verify them.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::hmac;

/// The prefix Standard Webhooks gives to a base64-encoded secret.
pub const WHSEC_PREFIX: &str = "whsec_";

/// Why a secret cannot serve as a signing key. Never carries the secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// `whsec_` followed by something that is not standard base64.
    NotBase64,
    /// `whsec_` followed by nothing.
    Empty,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::NotBase64 => write!(
                f,
                "starts with {WHSEC_PREFIX} but what follows is not valid base64, so it cannot \
                 be used as a Standard Webhooks key"
            ),
            KeyError::Empty => write!(f, "is {WHSEC_PREFIX} with no key after it"),
        }
    }
}

impl std::error::Error for KeyError {}

/// The HMAC key a secret stands for: base64-decoded after `whsec_`, its bytes otherwise.
pub fn key_from_secret(secret: &str) -> Result<Vec<u8>, KeyError> {
    match secret.strip_prefix(WHSEC_PREFIX) {
        None => Ok(secret.as_bytes().to_vec()),
        Some(encoded) => {
            let key = STANDARD
                .decode(encoded.trim())
                .map_err(|_| KeyError::NotBase64)?;
            if key.is_empty() {
                return Err(KeyError::Empty);
            }
            Ok(key)
        }
    }
}

/// The `webhook-signature` header value for one request.
pub fn signature(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&key, &signed_content(id, timestamp, body));
    format!("v1,{}", STANDARD.encode(tag.as_ref()))
}

/// True when one of the space-separated `v1,…` signatures in `header` is the one `key`
/// gives for this id, timestamp and body. The comparison is constant-time. Used by the
/// tests; the plugin's side is the PHP in `docs/plugin-contract.md`.
pub fn verify(key: &[u8], id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let content = signed_content(id, timestamp, body);
    header.split(' ').any(|candidate| {
        candidate
            .strip_prefix("v1,")
            .and_then(|b64| STANDARD.decode(b64).ok())
            .is_some_and(|tag| hmac::verify(&key, &content, &tag).is_ok())
    })
}

/// `{id}.{timestamp}.{body}`, the bytes the signature covers.
fn signed_content(id: &str, timestamp: u64, body: &[u8]) -> Vec<u8> {
    let mut content = format!("{id}.{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    content
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks reference implementations (their test
    /// suites sign this payload with this secret and expect this signature).
    #[test]
    fn matches_the_standard_webhooks_reference_example() {
        let key = key_from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_plain_secret_is_its_own_key() {
        assert_eq!(key_from_secret("s3cr3t").unwrap(), b"s3cr3t");
        assert_eq!(key_from_secret("whsec_AQID").unwrap(), [1, 2, 3]);
        assert_eq!(key_from_secret("whsec_*not*"), Err(KeyError::NotBase64));
        assert_eq!(key_from_secret("whsec_"), Err(KeyError::Empty));
        assert!(!KeyError::NotBase64.to_string().contains("*not*"));
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let key = b"k";
        let good = signature(key, "1-0", 100, b"{}");
        assert!(verify(key, "1-0", 100, b"{}", &good));
        assert!(verify(key, "1-0", 100, b"{}", &format!("v1,AAAA {good}")));
        assert!(!verify(key, "1-0", 100, b"{} ", &good));
        assert!(!verify(key, "1-1", 100, b"{}", &good));
        assert!(!verify(key, "1-0", 101, b"{}", &good));
        assert!(!verify(b"K", "1-0", 100, b"{}", &good));
        assert!(!verify(
            key,
            "1-0",
            100,
            b"{}",
            &good.replacen("v1,", "v2,", 1)
        ));
    }
}
