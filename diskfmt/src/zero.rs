//! Zero detection on buffers, used to keep thin targets thin.

/// Whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    // Compare 16-byte words (the compiler vectorises this), then the tail.
    let (words, tail) = buf.split_at(buf.len() / 16 * 16);
    words
        .chunks_exact(16)
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn finds_a_single_set_byte_anywhere() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        for i in [0, 15, 16, 4095, 4098] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}
