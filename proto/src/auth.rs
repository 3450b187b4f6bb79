//! The optional auth tag: per-player key derivation, tagging, constant-time verification and
//! the freshness rule.
//!
//! The server derives each player's key from one secret, so it keeps no per-player state; the
//! login service hands the same key to the player's client. A tag binds the header and payload
//! of one frame to that key, and the freshness rule bounds replays to the dedup window, inside
//! which a replayed copy is only ever a duplicate.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::frame::AUTH_TAG_BYTES;

/// Length of a per-player key: one HMAC-SHA256 output.
pub const PLAYER_KEY_BYTES: usize = 32;

/// Domain separation, so a player key can never equal an HMAC the secret makes for another use.
const PLAYER_KEY_LABEL: &[u8] = b"sg-player";

pub const MICROSECONDS_PER_SECOND: u64 = 1_000_000;

const _: () = assert!(AUTH_TAG_BYTES <= PLAYER_KEY_BYTES);

type HmacSha256 = Hmac<Sha256>;

/// K = HMAC-SHA256(secret, "sg-player" || player_id LE)
pub fn player_key(secret: &[u8], player_id: u64) -> [u8; PLAYER_KEY_BYTES] {
    let mut mac = keyed(secret);
    mac.update(PLAYER_KEY_LABEL);
    mac.update(&player_id.to_le_bytes());
    mac.finalize().into_bytes().into()
}

/// The first 16 bytes of HMAC-SHA256(K, signed bytes).
pub fn tag(player_key: &[u8; PLAYER_KEY_BYTES], signed: &[u8]) -> [u8; AUTH_TAG_BYTES] {
    let mut mac = keyed(player_key);
    mac.update(signed);
    let full: [u8; PLAYER_KEY_BYTES] = mac.finalize().into_bytes().into();
    let mut truncated = [0u8; AUTH_TAG_BYTES];
    truncated.copy_from_slice(&full[..AUTH_TAG_BYTES]);
    truncated
}

/// Whether `tag` is the tag of `signed` under `player_key`, compared in constant time so the
/// answer's timing does not reveal how many leading bytes of a forged tag were right.
pub fn verify(player_key: &[u8; PLAYER_KEY_BYTES], signed: &[u8], tag: &[u8; AUTH_TAG_BYTES]) -> bool {
    let mut mac = keyed(player_key);
    mac.update(signed);
    mac.verify_truncated_left(tag).is_ok()
}

/// The freshness rule: |client_time_us - now_us| <= window_us / 2.
///
/// A frame outside it is REJECTED, so a captured frame stops being accepted before its dedup
/// marker (kept for the whole window) expires. The boundary itself counts as fresh: the
/// protocol rejects only frames *further* than half the window.
pub fn is_fresh(client_time_us: u64, now_us: u64, dedup_window_secs: u64) -> bool {
    let window_us = dedup_window_secs.saturating_mul(MICROSECONDS_PER_SECOND);
    client_time_us.abs_diff(now_us) <= window_us / 2
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC hashes over-long keys and pads short ones, so no key length is invalid.
    HmacSha256::new_from_slice(key).expect("hmac accepts keys of any length")
}

#[cfg(test)]
mod tests {
    use super::*;

    // The key derivation matches protocol test vector 3.
    #[test]
    fn player_key_matches_vector_3() {
        let expected: [u8; 32] = [
            0xaf, 0xfd, 0xb8, 0x30, 0x77, 0x35, 0x1d, 0xd9, 0xb8, 0x8e, 0xfc, 0xda, 0x1e, 0xf8, 0xf2, 0xa8, 0x5b, 0x74,
            0x92, 0x32, 0x99, 0xc4, 0xe5, 0x24, 0x18, 0xe0, 0x0f, 0x23, 0xcb, 0xcc, 0x5f, 0x99,
        ];
        assert_eq!(player_key(b"gala-secret", 77), expected);
    }

    // verify accepts the tag that tag() made and refuses any change to the bytes or the tag.
    #[test]
    fn verify_accepts_only_the_right_tag() {
        let key = player_key(b"secret", 1);
        let signed = b"header and payload";
        let good = tag(&key, signed);
        assert!(verify(&key, signed, &good));
        assert!(!verify(&key, b"header and payloaD", &good));
        let mut bad = good;
        bad[AUTH_TAG_BYTES - 1] ^= 1;
        assert!(!verify(&key, signed, &bad));
        assert!(!verify(&player_key(b"secret", 2), signed, &good));
    }

    // Freshness is symmetric around now, inclusive at half the window, and saturates.
    #[test]
    fn freshness_window_is_half_the_dedup_window() {
        let now_us = 1_700_000_000_000_000;
        let half_us = 300 * MICROSECONDS_PER_SECOND;
        assert!(is_fresh(now_us, now_us, 600));
        assert!(is_fresh(now_us - half_us, now_us, 600));
        assert!(is_fresh(now_us + half_us, now_us, 600));
        assert!(!is_fresh(now_us - half_us - 1, now_us, 600));
        assert!(!is_fresh(now_us + half_us + 1, now_us, 600));
        assert!(is_fresh(0, u64::MAX / 2, u64::MAX));
        assert!(!is_fresh(0, u64::MAX, u64::MAX));
        assert!(!is_fresh(0, 1, 0));
    }
}
