//! The key that encrypts a node's stored history, and its AEAD.
//!
//! ```text
//! key    = HKDF-SHA256(salt = "p2p-node/v1/history-key", ikm = identity seed,
//!                      info = "xchacha20poly1305")             32 bytes
//! check  = HKDF-SHA256(same salt and ikm, info = "key-check")   8 bytes, little-endian u64
//! sealed = nonce (24, random) | XChaCha20-Poly1305(key, nonce, associated data, plain)
//! ```
//!
//! The key is derived from the identity seed, with its own domain tag, so it needs no
//! storage, is never the signing key itself, and does not change when the passphrase
//! protecting the key file changes. `check` identifies the key without revealing it (a
//! separate HKDF output), so a database can tell "encrypted by another identity" from
//! corruption.
//!
//! Nonces are 192 random bits from a CSPRNG, fresh for every encryption: the chance
//! that two of 2^48 encryptions share one is about 2^-97, so a nonce never repeats under
//! the key. The caller binds each ciphertext to where it is stored through the associated
//! data (e.g. the table and the row key), so rows cannot be swapped.
//!
//! XChaCha20-Poly1305 is computed as specified (draft-irtf-cfrg-xchacha): HChaCha20 of the
//! key and the first 16 nonce bytes gives a subkey for IETF ChaCha20-Poly1305 with nonce
//! `0u32 | last 8 nonce bytes`; the IETF AEAD is ring's, the fastest available here for
//! short rows. A test checks every output against the `chacha20poly1305` crate.

use std::fmt;

use chacha20::{cipher::consts::U10, hchacha};
use hkdf::Hkdf;
use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::SecretKey;

/// Bytes of the random nonce at the start of a sealed value.
pub const NONCE_LEN: usize = 24;
/// Bytes of the authentication tag at its end.
pub const TAG_LEN: usize = 16;
/// Bytes sealing adds to a value.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

const SALT: &[u8] = b"p2p-node/v1/history-key";

/// A sealed value does not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Shorter than a nonce and a tag.
    #[error("sealed value is too short ({0} bytes)")]
    Truncated(usize),
    /// The tag does not verify: another key, other associated data, or altered bytes.
    #[error("sealed value does not decrypt (another key, moved or altered)")]
    Decrypt,
}

/// The symmetric key of the stored history. Zeroized on drop, hidden in Debug.
#[derive(Clone)]
pub struct HistoryKey {
    key: Zeroizing<[u8; 32]>,
    check: u64,
}

impl fmt::Debug for HistoryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HistoryKey")
            .field("check", &format_args!("{:016x}", self.check))
            .finish_non_exhaustive()
    }
}

impl SecretKey {
    /// The key that encrypts this identity's stored history (see [`HistoryKey`]).
    pub fn history_key(&self) -> HistoryKey {
        let seed = self.to_bytes();
        let hk = Hkdf::<Sha256>::new(Some(SALT), seed.as_ref());
        let mut key = Zeroizing::new([0u8; 32]);
        hk.expand(b"xchacha20poly1305", key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let mut check = [0u8; 8];
        hk.expand(b"key-check", &mut check)
            .expect("8 bytes is a valid HKDF-SHA256 output length");
        HistoryKey {
            key,
            check: u64::from_le_bytes(check),
        }
    }
}

impl HistoryKey {
    /// A value that identifies this key (stored beside the data it encrypts) without
    /// revealing anything about it.
    pub fn check_value(&self) -> u64 {
        self.check
    }

    /// The IETF ChaCha20-Poly1305 key and nonce for one XChaCha20 nonce.
    fn ietf(&self, nonce: &[u8; NONCE_LEN]) -> (LessSafeKey, Nonce) {
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&nonce[..16]);
        let mut subkey = hchacha::<U10>(self.key.as_ref().into(), &prefix.into());
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, subkey.as_slice());
        subkey.as_mut_slice().zeroize();
        let key = LessSafeKey::new(unbound.expect("32 bytes is the ChaCha20-Poly1305 key length"));
        let mut ietf = [0u8; 12];
        ietf[4..].copy_from_slice(&nonce[16..]);
        (key, Nonce::assume_unique_for_key(ietf))
    }

    /// Appends `nonce | ciphertext | tag` of `plain`, bound to `aad`, to `out`.
    pub fn seal_into(&self, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        self.seal_with_nonce(&nonce, aad, plain, out);
    }

    fn seal_with_nonce(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plain: &[u8],
        out: &mut Vec<u8>,
    ) {
        let (key, ietf) = self.ietf(nonce);
        out.reserve(OVERHEAD + plain.len());
        out.extend_from_slice(nonce);
        let start = out.len();
        out.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(ietf, Aad::from(aad), &mut out[start..])
            .expect("ChaCha20-Poly1305 seals any in-memory value");
        out.extend_from_slice(tag.as_ref());
    }

    /// `nonce | ciphertext | tag` of `plain`, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal_into(aad, plain, &mut out);
        out
    }

    /// The plain value of `sealed`, if it was sealed by this key with this `aad`. Never
    /// panics, whatever the bytes.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        if sealed.len() < OVERHEAD {
            return Err(OpenError::Truncated(sealed.len()));
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(nonce);
        let (key, ietf) = self.ietf(&n);
        let mut buf = Zeroizing::new(body.to_vec());
        let len = key
            .open_in_place(ietf, Aad::from(aad), buf.as_mut_slice())
            .map_err(|_| OpenError::Decrypt)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use chacha20poly1305::{
        aead::{Aead, Payload},
        KeyInit, XChaCha20Poly1305,
    };
    use proptest::prelude::*;

    use super::*;

    fn key(seed: u8) -> HistoryKey {
        SecretKey::from_bytes(&[seed; 32]).history_key()
    }

    #[test]
    fn derived_from_the_seed_with_its_own_domain() {
        let sk = SecretKey::from_bytes(&[7; 32]);
        assert_eq!(*sk.history_key().key, *key(7).key);
        assert_ne!(*key(7).key, *key(8).key);
        assert_ne!(key(7).check_value(), key(8).check_value());
        // Neither the seed nor the mailbox key.
        assert_ne!(*key(7).key, *sk.to_bytes());
        assert_ne!(*key(7).key, sk.mailbox_secret().0.to_bytes());
        assert!(!format!("{:?}", key(7)).contains(&format!("{:?}", &key(7).key[..4])));
    }

    #[test]
    fn wrong_key_aad_or_bytes_do_not_open() {
        let k = key(1);
        let sealed = k.seal(b"row 1", b"hello");
        assert_eq!(sealed.len(), OVERHEAD + 5);
        assert_eq!(
            k.open(b"row 1", &sealed).expect("opens").as_slice(),
            b"hello"
        );
        assert_eq!(key(2).open(b"row 1", &sealed), Err(OpenError::Decrypt));
        assert_eq!(k.open(b"row 2", &sealed), Err(OpenError::Decrypt));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(k.open(b"row 1", &bad), Err(OpenError::Decrypt), "byte {i}");
        }
        for n in 0..OVERHEAD {
            assert_eq!(k.open(b"row 1", &sealed[..n]), Err(OpenError::Truncated(n)));
        }
        assert_ne!(
            k.seal(b"row 1", b"hello"),
            sealed,
            "a fresh nonce every time"
        );
    }

    proptest! {
        /// The composition is XChaCha20-Poly1305 exactly: the `chacha20poly1305` crate
        /// opens what it seals and seals what it opens, byte for byte.
        #[test]
        fn equals_the_reference_xchacha20poly1305(
            seed in any::<u8>(),
            nonce in any::<[u8; 24]>(),
            aad in proptest::collection::vec(any::<u8>(), 0..80),
            plain in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let k = key(seed);
            let mut ours = Vec::new();
            k.seal_with_nonce(&nonce, &aad, &plain, &mut ours);
            let reference = XChaCha20Poly1305::new(k.key.as_ref().into())
                .encrypt(&nonce.into(), Payload { msg: &plain, aad: &aad })
                .expect("encrypts");
            prop_assert_eq!(&ours[..NONCE_LEN], &nonce[..]);
            prop_assert_eq!(&ours[NONCE_LEN..], &reference[..]);
            let opened = k.open(&aad, &ours).expect("opens");
            prop_assert_eq!(opened.as_slice(), &plain[..]);
        }
    }
}
