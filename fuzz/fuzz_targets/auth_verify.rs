//! The auth tag on arbitrary secrets, players and bytes: `verify` accepts the tag `tag` made,
//! refuses it after any one bit of the tag or of the signed bytes flips or under another player's
//! key, answers an arbitrary tag exactly as comparing it with the right one would, and the
//! freshness rule is symmetric and never panics.
//!
//! Input layout: byte 0 is the secret's length (mod 65), then the secret, the player id (u64 LE),
//! a bit index (u16 LE), a candidate tag (16 bytes), a client time and a server time (u64 LE
//! each), a window in seconds (u64 LE); the rest is the signed bytes. Missing fields are zero.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardgate_proto::auth;
use shardgate_proto::frame::AUTH_TAG_BYTES;

const SECRET_BYTES_MAX: usize = 64;

/// Takes fields off the front of the input; a field past the end reads as zeros.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, count: usize) -> &'a [u8] {
        let (field, rest) = self.0.split_at(count.min(self.0.len()));
        self.0 = rest;
        field
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut array = [0u8; N];
        let field = self.take(N);
        array[..field.len()].copy_from_slice(field);
        array
    }
}

fuzz_target!(|data: &[u8]| {
    let mut fields = Fields(data);
    let secret_bytes = usize::from(fields.array::<1>()[0]) % (SECRET_BYTES_MAX + 1);
    let secret = fields.take(secret_bytes);
    let player_id = u64::from_le_bytes(fields.array());
    let bit_index = usize::from(u16::from_le_bytes(fields.array()));
    let candidate_tag: [u8; AUTH_TAG_BYTES] = fields.array();
    let client_time_us = u64::from_le_bytes(fields.array());
    let now_us = u64::from_le_bytes(fields.array());
    let window_secs = u64::from_le_bytes(fields.array());
    let signed = fields.0;

    let player_key = auth::player_key(secret, player_id);
    let good_tag = auth::tag(&player_key, signed);
    assert!(
        auth::verify(&player_key, signed, &good_tag),
        "verify refused tag's own tag"
    );

    let mut flipped_tag = good_tag;
    flipped_tag[(bit_index / 8) % AUTH_TAG_BYTES] ^= 1 << (bit_index % 8);
    assert!(
        !auth::verify(&player_key, signed, &flipped_tag),
        "a tag with a flipped bit passed"
    );

    if !signed.is_empty() {
        let mut flipped_signed = signed.to_vec();
        flipped_signed[(bit_index / 8) % signed.len()] ^= 1 << (bit_index % 8);
        assert!(
            !auth::verify(&player_key, &flipped_signed, &good_tag),
            "flipped signed bytes passed"
        );
    }

    let other_player_key = auth::player_key(secret, player_id.wrapping_add(1));
    assert_ne!(other_player_key, player_key, "two players share a key");
    assert!(
        !auth::verify(&other_player_key, signed, &good_tag),
        "another player's key passed"
    );

    assert_eq!(
        auth::verify(&player_key, signed, &candidate_tag),
        candidate_tag == good_tag,
        "verify disagrees with comparing tags"
    );

    assert_eq!(
        auth::is_fresh(client_time_us, now_us, window_secs),
        auth::is_fresh(now_us, client_time_us, window_secs),
        "freshness is not symmetric"
    );
    assert!(auth::is_fresh(now_us, now_us, window_secs), "now is not fresh");
});
