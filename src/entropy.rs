//! Randomness from the OS CSPRNG (via ring, already in the tree): stream ids, dev keys, jitter.

use ring::rand::{SecureRandom, SystemRandom};

/// Fills `buf` with random bytes.
///
/// # Panics
/// If the OS random source fails, which on Linux means the process cannot run safely anyway.
pub fn fill(buf: &mut [u8]) {
    SystemRandom::new()
        .fill(buf)
        .expect("the OS random number generator failed");
}

pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    fill(&mut b);
    u64::from_le_bytes(b)
}
