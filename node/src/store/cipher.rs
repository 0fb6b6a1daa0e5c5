//! Message rows at rest: clear, or sealed under the history key.
//!
//! In a clear database (schema 1 and 3) the record of a message row
//! ([`super::tables::HISTORY`]) is the postcard `MessageRecord`. In an encrypted database
//! (schema 2 and 4) it is
//!
//! ```text
//! format 1 = 0x01 | nonce (24) | XChaCha20-Poly1305 ciphertext of the postcard record | tag (16)
//! associated data = "p2p-node/v1/message" | peer (32) | stored_at_ms (8, big-endian) | id (16)
//! ```
//!
//! under [`HistoryKey`] (`p2p_crypto::history`). The associated data is the message's key
//! ([`MessageKey`]: peer, time, id), so a record moved to another row (another
//! conversation, time or id) does not decrypt. Keys, peers and links stay clear: walking a
//! conversation and the message-id index work as in a clear database.

use std::ops::Deref;

use p2p_crypto::history::HistoryKey;
use zeroize::Zeroizing;

use super::{opened::SealId, tables::MessageKey, RecordError};

/// The format byte of a sealed row.
const SEALED_V1: u8 = 1;
const AAD_TAG: &[u8] = b"p2p-node/v1/message";
const AAD_LEN: usize = AAD_TAG.len() + 32 + 8 + 16;
const LOG_AAD_TAG: &[u8] = b"p2p-node/v1/log";
const LOG_AAD_LEN: usize = LOG_AAD_TAG.len() + 8 + 8;

/// How the message rows of one database are stored.
#[derive(Debug, Clone)]
pub(crate) enum RowCipher {
    /// In clear (protected by file permissions only).
    Clear,
    /// Sealed under this key.
    Sealed(HistoryKey),
}

/// A row's plain bytes: borrowed from the database when it is clear, decrypted (and
/// zeroized on drop) when it is sealed.
pub(crate) enum Plain<'a> {
    Borrowed(&'a [u8]),
    Owned(Zeroizing<Vec<u8>>),
}

impl Deref for Plain<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Plain::Borrowed(b) => b,
            Plain::Owned(v) => v,
        }
    }
}

fn aad(key: &MessageKey) -> [u8; AAD_LEN] {
    let mut a = [0u8; AAD_LEN];
    let (tag, rest) = a.split_at_mut(AAD_TAG.len());
    tag.copy_from_slice(AAD_TAG);
    rest[..32].copy_from_slice(&key.0);
    rest[32..40].copy_from_slice(&key.1.to_be_bytes());
    rest[40..].copy_from_slice(&key.2);
    a
}

/// The associated data of a write-log record: its epoch and offset (see `store/log.rs`).
fn log_aad(epoch: u64, offset: u64) -> [u8; LOG_AAD_LEN] {
    let mut a = [0u8; LOG_AAD_LEN];
    let (tag, rest) = a.split_at_mut(LOG_AAD_TAG.len());
    tag.copy_from_slice(LOG_AAD_TAG);
    rest[..8].copy_from_slice(&epoch.to_be_bytes());
    rest[8..].copy_from_slice(&offset.to_be_bytes());
    a
}

/// The nonce and tag of a sealed row's stored value (see [`super::opened`]); `None` for a
/// value that is not a sealed row.
pub(crate) fn seal_id(stored: &[u8]) -> Option<SealId> {
    use p2p_crypto::history::{NONCE_LEN, OVERHEAD, TAG_LEN};
    match stored.split_first() {
        Some((&SEALED_V1, sealed)) if sealed.len() >= OVERHEAD => {
            let mut id = [0u8; NONCE_LEN + TAG_LEN];
            id[..NONCE_LEN].copy_from_slice(&sealed[..NONCE_LEN]);
            id[NONCE_LEN..].copy_from_slice(&sealed[sealed.len() - TAG_LEN..]);
            Some(id)
        }
        _ => None,
    }
}

impl RowCipher {
    /// Whether rows are sealed.
    pub(crate) fn is_sealed(&self) -> bool {
        matches!(self, RowCipher::Sealed(_))
    }

    /// The stored value of the row `key` whose plain value is `plain` (zeroized once
    /// sealed).
    pub(crate) fn seal(&self, key: &MessageKey, plain: Vec<u8>) -> Vec<u8> {
        self.seal_with(&aad(key), plain)
    }

    /// The plain value of the row `key` stored as `stored`. Never panics.
    pub(crate) fn open<'a>(
        &self,
        key: &MessageKey,
        stored: &'a [u8],
    ) -> Result<Plain<'a>, RecordError> {
        self.open_with(&aad(key), stored)
    }

    /// The payload of the write-log record at `offset` of `epoch` whose plain content is
    /// `plain` (zeroized once sealed).
    pub(crate) fn seal_log(&self, epoch: u64, offset: u64, plain: Vec<u8>) -> Vec<u8> {
        self.seal_with(&log_aad(epoch, offset), plain)
    }

    /// The plain content of the write-log record at `offset` of `epoch`. Never panics.
    pub(crate) fn open_log<'a>(
        &self,
        epoch: u64,
        offset: u64,
        stored: &'a [u8],
    ) -> Result<Plain<'a>, RecordError> {
        self.open_with(&log_aad(epoch, offset), stored)
    }

    fn seal_with(&self, aad: &[u8], plain: Vec<u8>) -> Vec<u8> {
        match self {
            RowCipher::Clear => plain,
            RowCipher::Sealed(k) => {
                let plain = Zeroizing::new(plain);
                let mut out = Vec::with_capacity(1 + p2p_crypto::history::OVERHEAD + plain.len());
                out.push(SEALED_V1);
                k.seal_into(aad, &plain, &mut out);
                out
            }
        }
    }

    fn open_with<'a>(&self, aad: &[u8], stored: &'a [u8]) -> Result<Plain<'a>, RecordError> {
        match self {
            RowCipher::Clear => Ok(Plain::Borrowed(stored)),
            RowCipher::Sealed(k) => match stored.split_first() {
                Some((&SEALED_V1, sealed)) => k
                    .open(aad, sealed)
                    .map(Plain::Owned)
                    .map_err(RecordError::Decrypt),
                Some((&format, _)) => Err(RecordError::UnknownFormat(format)),
                None => Err(RecordError::UnknownFormat(0)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use p2p_crypto::{history::OpenError, SecretKey};

    use super::*;

    #[test]
    fn a_row_opens_only_at_its_own_key() {
        let c = RowCipher::Sealed(SecretKey::generate().history_key());
        let key = ([1; 32], 5, [2; 16]);
        let stored = c.seal(&key, b"record".to_vec());
        assert_eq!(stored[0], SEALED_V1);
        assert!(!stored.windows(6).any(|w| w == b"record"));
        assert_eq!(&*c.open(&key, &stored).expect("opens"), b"record");
        for other in [
            ([9; 32], 5, [2; 16]),
            ([1; 32], 6, [2; 16]),
            ([1; 32], 5, [3; 16]),
        ] {
            assert!(matches!(
                c.open(&other, &stored),
                Err(RecordError::Decrypt(OpenError::Decrypt))
            ));
        }
        let mut bad = stored.clone();
        bad[0] = 7;
        assert!(matches!(
            c.open(&key, &bad),
            Err(RecordError::UnknownFormat(7))
        ));
        assert!(c.open(&key, &[]).is_err());
        assert!(c.open(&key, &[SEALED_V1]).is_err());
        assert_eq!(
            &*RowCipher::Clear.open(&key, b"clear").expect("clear"),
            b"clear"
        );
    }

    #[test]
    fn a_log_record_opens_only_at_its_own_epoch_and_offset() {
        let c = RowCipher::Sealed(SecretKey::generate().history_key());
        let stored = c.seal_log(3, 40, b"batch".to_vec());
        assert!(!stored.windows(5).any(|w| w == b"batch"));
        assert_eq!(&*c.open_log(3, 40, &stored).expect("opens"), b"batch");
        assert!(c.open_log(4, 40, &stored).is_err());
        assert!(c.open_log(3, 41, &stored).is_err());
        assert!(
            c.open(&([0; 32], 3, [0; 16]), &stored).is_err(),
            "not a row"
        );
        assert_eq!(
            &*RowCipher::Clear.seal_log(3, 40, b"batch".to_vec()),
            b"batch"
        );
    }

    #[test]
    fn a_seal_id_is_the_nonce_and_tag_of_one_sealing() {
        let c = RowCipher::Sealed(SecretKey::generate().history_key());
        let key = ([1; 32], 5, [2; 16]);
        let a = c.seal(&key, b"record".to_vec());
        let b = c.seal(&key, b"record".to_vec());
        let id = seal_id(&a).expect("sealed");
        assert_eq!(id[..24], a[1..25]);
        assert_eq!(id[24..], a[a.len() - 16..]);
        assert_ne!(Some(id), seal_id(&b), "each sealing has its own nonce");
        assert_eq!(seal_id(&a[..40]), None, "too short");
        let mut other = a.clone();
        other[0] = 2;
        assert_eq!(seal_id(&other), None);
        assert_eq!(seal_id(&[]), None);
    }
}
