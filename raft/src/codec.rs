//! The one place that knows bincode. Everything raftmgr puts on the wire or on disk in binary goes
//! through [`encode`] and [`decode`], with one fixed configuration (fixed-width integers, little
//! endian, no trailing bytes) and a size limit, so that garbage input is an error, never a huge
//! allocation or a panic.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest value [`decode`] accepts: snapshots travel in chunks well below this.
pub const DECODE_LIMIT_BYTES: u64 = 64 * 1024 * 1024;

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(DECODE_LIMIT_BYTES)
}

#[derive(Debug, thiserror::Error)]
#[error("cannot decode {what}: {source}")]
pub struct DecodeError {
    pub what: &'static str,
    #[source]
    pub source: bincode::Error,
}

/// Encodes a value. Serialising our own types cannot fail (no maps with non-string keys matter to
/// bincode, no `deserialize_any`), so a failure here is a bug and panics.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    options()
        .serialize(value)
        .expect("raftmgr types always serialise with bincode")
}

/// Decodes `bytes` as a `T`; `what` names the thing for the error message.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    options()
        .deserialize(bytes)
        .map_err(|source| DecodeError { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let value: (u64, String) = (7, "node1".into());
        let bytes = encode(&value);
        assert_eq!(decode::<(u64, String)>("pair", &bytes).unwrap(), value);

        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode::<(u64, String)>("pair", &trailing).is_err());

        // A length prefix claiming 2^63 bytes must be refused, not allocated.
        let mut huge = 7u64.to_le_bytes().to_vec();
        huge.extend_from_slice(&(1u64 << 63).to_le_bytes());
        let err = decode::<(u64, String)>("pair", &huge).unwrap_err();
        assert!(err.to_string().starts_with("cannot decode pair"), "{err}");
    }
}
