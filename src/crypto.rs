//! Encryption of large bodies in the event stream (`dispatched.encryption_key`).
//!
//! A body whose JSON text is longer than [`ENCRYPT_OVER_BYTES`] is stored in events as
//! `{"encrypted": "aes-256-gcm", "nonce": .., "ciphertext": .., "bytes": n}` with the key
//! sha256(encryption_key). `dispatched.decrypt(value)` (superusers) turns it back.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const ENCRYPT_OVER_BYTES: usize = 16 * 1024;

fn cipher(key: &str) -> Aes256Gcm {
    let k = Sha256::digest(key.as_bytes());
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&k))
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Encrypts `data.body` in place when a key is set and the body is large.
pub fn encrypt_large_body(data: &mut Value, key: &str) {
    if key.is_empty() {
        return;
    }
    let Some(body) = data.get("body") else { return };
    let text = body.to_string();
    if text.len() <= ENCRYPT_OVER_BYTES {
        return;
    }
    let mut nonce = [0u8; 12];
    if !unsafe { pg_sys::pg_strong_random(nonce.as_mut_ptr().cast(), nonce.len()) } {
        data["body"] = json!({"encrypted": "failed", "bytes": text.len()});
        return;
    }
    match cipher(key).encrypt(Nonce::from_slice(&nonce), text.as_bytes()) {
        Ok(ct) => {
            data["body"] = json!({
                "encrypted": "aes-256-gcm",
                "nonce": b64().encode(nonce),
                "ciphertext": b64().encode(ct),
                "bytes": text.len(),
            })
        }
        Err(_) => data["body"] = json!({"encrypted": "failed", "bytes": text.len()}),
    }
}

/// Decrypts a body stored encrypted in an event (superusers only; needs the same
/// `dispatched.encryption_key`).
#[pg_extern(schema = "dispatched", stable)]
fn decrypt(value: JsonB) -> JsonB {
    let v = value.0;
    let field = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .and_then(|s| b64().decode(s).ok())
    };
    let (Some(nonce), Some(ct)) = (field("nonce"), field("ciphertext")) else {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "value: not an encrypted body (needs nonce and ciphertext)"
        );
        unreachable!()
    };
    let key = crate::settings::text(&crate::settings::ENCRYPTION_KEY);
    if key.is_empty() || nonce.len() != 12 {
        error!("dispatched.decrypt: dispatched.encryption_key is not set");
    }
    match cipher(&key).decrypt(Nonce::from_slice(&nonce), ct.as_slice()) {
        Ok(plain) => match serde_json::from_slice(&plain) {
            Ok(j) => JsonB(j),
            Err(_) => error!("dispatched.decrypt: the decrypted body is not JSON"),
        },
        Err(_) => error!("dispatched.decrypt: wrong key or damaged ciphertext"),
    }
}
