//! `p2p_crypto::seal`: opening arbitrary bytes with a fixed recipient key, and sealing
//! arbitrary payloads from arbitrary senders.
//!
//! Invariants:
//! - `open` never panics, whatever the bytes;
//! - `open(seal(x)) == x`, with the sender's NodeId, and the envelope is exactly
//!   `OVERHEAD` bytes longer than the payload;
//! - any single changed byte, any truncation and the wrong recipient make `open` fail.

#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use p2p_crypto::seal::{open, seal, SealError, OVERHEAD};
use p2p_crypto::SecretKey;
use p2p_fuzz::{fixed_key, other_key, seal_mode};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % seal_mode::COUNT == seal_mode::RAW {
        match open(&fixed_key(), rest) {
            Ok(opened) => assert_eq!(opened.payload.len() + OVERHEAD, rest.len()),
            Err(SealError::Truncated(n)) => assert!(n == rest.len() && n < OVERHEAD),
            Err(_) => assert!(rest.len() >= OVERHEAD),
        }
    } else {
        let _ = check_structured(&mut Unstructured::new(rest));
    }
});

fn check_structured(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let sender = SecretKey::from_bytes(&u.arbitrary()?);
    let flip_at: usize = u.arbitrary()?;
    let flip = u.arbitrary::<u8>()?.max(1);
    let cut: usize = u.arbitrary()?;
    let payload = u.bytes(u.len())?;
    let to = fixed_key();
    let env = seal(
        &sender,
        &to.public(),
        &to.mailbox_secret().public(),
        payload,
    );
    assert_eq!(env.len(), payload.len() + OVERHEAD);

    let opened = open(&to, &env).expect("a sealed envelope opens");
    assert_eq!(opened.sender, sender.public());
    assert_eq!(opened.payload, payload);

    let mut bad = env.clone();
    bad[flip_at % env.len()] ^= flip;
    assert!(open(&to, &bad).is_err(), "a changed byte was accepted");

    assert!(
        open(&to, &env[..cut % env.len()]).is_err(),
        "a cut was accepted"
    );
    assert_eq!(open(&other_key(), &env), Err(SealError::Decrypt));
    Ok(())
}
