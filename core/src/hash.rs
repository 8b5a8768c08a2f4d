//! The two hashes of the contract: the Layer 2 invocation id and the Layer 1 cache key.

use sha2::{Digest, Sha256};

/// Lower-case hex sha256 of a string.
pub fn sha256_hex(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Layer 2: `sha256(runId ':' nodeId ':' attempt ':' providerKey)`, attempt zero-based.
pub fn invocation_id(run_id: &str, node_id: &str, attempt: u32, provider_key: &str) -> String {
    sha256_hex(&format!("{run_id}:{node_id}:{attempt}:{provider_key}"))
}

/// Layer 1: `sha256(tenant ':' endpoint ':' key)`.
pub fn cache_key(tenant: &str, endpoint: &str, key: &str) -> String {
    sha256_hex(&format!("{tenant}:{endpoint}:{key}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sha256_values() {
        // `printf '' | sha256sum` and `printf 'abc' | sha256sum`
        assert_eq!(
            sha256_hex(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn invocation_id_is_sha256_of_the_joined_parts() {
        // printf 'run_1:charge:0:stripe:create-charge' | sha256sum
        assert_eq!(
            invocation_id("run_1", "charge", 0, "stripe:create-charge"),
            "851a1bfed72f2580bb58693ebd4dd6c4fe959581d73df6a63b0b16b12006c9e6"
        );
        assert_eq!(
            invocation_id("run_1", "charge", 0, "stripe:create-charge"),
            sha256_hex("run_1:charge:0:stripe:create-charge")
        );
        assert_ne!(
            invocation_id("run_1", "charge", 0, "p"),
            invocation_id("run_1", "charge", 1, "p")
        );
    }

    #[test]
    fn cache_key_is_sha256_of_the_joined_parts() {
        // printf 'alice:POST /api/runs:k1' | sha256sum
        assert_eq!(
            cache_key("alice", "POST /api/runs", "k1"),
            "29cde931b01d6b122ca7af89fe9270d286c6daf34a4fe330976d0cd0835b83c3"
        );
        // printf 'a:b:c' | sha256sum
        assert_eq!(
            cache_key("a", "b", "c"),
            "b0ee04f880c4ff4261479e2e7822b7410aee4c7159f4185ad5b0d88a312b495e"
        );
    }
}
