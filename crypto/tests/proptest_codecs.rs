//! Properties of the crypto crate's codecs: the NodeId / key / signature text forms and
//! sealed envelopes.

use p2p_crypto::seal::{open, seal, SealError, OVERHEAD};
use p2p_crypto::{MailboxPublicKey, NodeId, PublicKey, SecretKey, Signature, NODE_ID_TEXT_LEN};
use proptest::prelude::*;

const BASE32: &str = "abcdefghijklmnopqrstuvwxyz234567";

fn key() -> impl Strategy<Value = SecretKey> {
    any::<[u8; 32]>().prop_map(|s| SecretKey::from_bytes(&s))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn node_id_text_round_trips(k in key()) {
        let id = k.public();
        let text = id.to_string();
        prop_assert_eq!(text.len(), NODE_ID_TEXT_LEN);
        prop_assert!(text.bytes().all(|b| BASE32.as_bytes().contains(&b)));
        prop_assert_eq!(text.parse::<NodeId>(), Ok(id));
        prop_assert!(text.starts_with(&id.fingerprint()));
        // Upper case, padding, and one character more or less are refused.
        prop_assert!(text.to_uppercase().parse::<NodeId>().is_err());
        let padded = text.clone() + "====";
        let longer = text.clone() + "a";
        prop_assert!(padded.parse::<NodeId>().is_err());
        prop_assert!(text[1..].parse::<NodeId>().is_err());
        prop_assert!(longer.parse::<NodeId>().is_err());
    }

    #[test]
    fn node_id_text_changes_never_alias(k in key(), at in 0..NODE_ID_TEXT_LEN, c in 0..32usize) {
        // Changing one character gives an error or a different id: one text per id.
        let id = k.public();
        let mut text = id.to_string().into_bytes();
        let new = BASE32.as_bytes()[c];
        prop_assume!(text[at] != new);
        text[at] = new;
        let text = String::from_utf8(text).expect("ascii");
        if let Ok(other) = text.parse::<NodeId>() {
            prop_assert_ne!(other, id);
            prop_assert_eq!(other.to_string(), text);
        }
    }

    #[test]
    fn any_32_bytes_parse_or_fail_consistently(bytes in any::<[u8; 32]>()) {
        match PublicKey::from_bytes(&bytes) {
            Ok(id) => {
                prop_assert_eq!(id.as_bytes(), &bytes);
                prop_assert_eq!(id.to_string().parse::<NodeId>(), Ok(id));
                prop_assert_eq!(PublicKey::try_from_slice(&bytes), Ok(id));
            }
            Err(_) => prop_assert!(PublicKey::try_from_slice(&bytes).is_err()),
        }
        let mk = MailboxPublicKey(bytes);
        prop_assert_eq!(mk.to_string().parse::<MailboxPublicKey>(), Ok(mk));
    }

    #[test]
    fn signature_text_round_trips(bytes in proptest::collection::vec(any::<u8>(), 64)) {
        let sig = Signature(bytes.try_into().expect("64 bytes"));
        prop_assert_eq!(sig.to_string().parse::<Signature>(), Ok(sig));
    }

    #[test]
    fn any_text_parses_only_to_its_own_form(text in "[a-z2-7A-Z=]{0,60}") {
        if let Ok(id) = text.parse::<NodeId>() {
            prop_assert_eq!(id.to_string(), text);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn sealed_envelopes_open_only_as_sealed(
        sender in key(),
        to in key(),
        other in key(),
        payload in proptest::collection::vec(any::<u8>(), 0..600),
        flip_at in any::<usize>(),
        flip in 1u8..,
        cut in any::<usize>(),
    ) {
        prop_assume!(to.public() != other.public());
        let env = seal(&sender, &to.public(), &to.mailbox_secret().public(), &payload);
        prop_assert_eq!(env.len(), payload.len() + OVERHEAD);
        let opened = open(&to, &env).expect("opens");
        prop_assert_eq!(opened.sender, sender.public());
        prop_assert_eq!(&opened.payload, &payload);

        let mut bad = env.clone();
        bad[flip_at % env.len()] ^= flip;
        prop_assert!(open(&to, &bad).is_err());
        prop_assert!(open(&to, &env[..cut % env.len()]).is_err());
        prop_assert_eq!(open(&other, &env), Err(SealError::Decrypt));
        // Sealed to `to`'s NodeId but `other`'s mailbox key: `to` cannot open it, and
        // `other` sees a recipient that is not itself.
        let misaddressed = seal(&sender, &to.public(), &other.mailbox_secret().public(), &payload);
        prop_assert!(open(&to, &misaddressed).is_err());
        prop_assert_eq!(open(&other, &misaddressed), Err(SealError::BadSignature));
    }

    #[test]
    fn open_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), k in key()) {
        let _ = open(&k, &bytes);
    }
}
