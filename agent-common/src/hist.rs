//! Log2 histogram slots, shared by the kernel side (which picks a slot) and userspace (which
//! turns slots into Prometheus bucket bounds).
//!
//! Slot `s` counts values `v` with `2^(s-1) <= v < 2^s` (slot 0 holds `v == 0`), the layout
//! bcc/libbpf-tools use for their log2 histograms.

/// Number of slots: enough for any `u64` value (slot 64 holds `v >= 2^63`).
pub const HIST_SLOTS: usize = 65;

/// Slot index of `v`: the number of significant bits, so 0 -> 0, 1 -> 1, 2..=3 -> 2, 4..=7 -> 3.
#[inline(always)]
#[must_use]
pub const fn slot(v: u64) -> usize {
    // A binary search for the highest set bit: eBPF has no count-leading-zeros instruction, and
    // LLVM emulates `leading_zeros` with ~45 dependent instructions; this is six steps.
    if v == 0 {
        return 0;
    }
    let (mut v, mut s) = (v, 1);
    if v >= 1 << 32 {
        v >>= 32;
        s += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        s += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        s += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        s += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        s += 2;
    }
    if v >= 1 << 1 {
        s += 1;
    }
    s
}

/// Exclusive upper bound of slot `s` (`2^s`), saturating at `u64::MAX` for the last slot.
#[must_use]
pub const fn slot_upper_bound(s: usize) -> u64 {
    if s >= 64 { u64::MAX } else { 1u64 << s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_powers_of_two() {
        assert_eq!(slot(0), 0);
        assert_eq!(slot(1), 1);
        assert_eq!(slot(2), 2);
        assert_eq!(slot(3), 2);
        assert_eq!(slot(4), 3);
        assert_eq!(slot(1023), 10);
        assert_eq!(slot(1024), 11);
        assert_eq!(slot(u64::MAX), 64);
        assert!(slot(u64::MAX) < HIST_SLOTS);
    }

    #[test]
    fn slot_is_the_bit_length() {
        let check = |v: u64| assert_eq!(slot(v), (u64::BITS - v.leading_zeros()) as usize, "{v}");
        check(0);
        check(u64::MAX);
        for b in 0..64 {
            let p = 1u64 << b;
            for v in [p - 1, p, p + 1, p | (p >> 1), p.wrapping_mul(3)] {
                check(v);
            }
        }
    }

    #[test]
    fn every_value_is_below_its_slot_bound() {
        for v in [0u64, 1, 2, 3, 7, 8, 1_000, 65_535, 1 << 40, (1 << 63) - 1] {
            let s = slot(v);
            assert!(v < slot_upper_bound(s), "{v} in slot {s}");
            if s > 0 {
                assert!(v >= slot_upper_bound(s - 1), "{v} in slot {s}");
            }
        }
        assert_eq!(slot_upper_bound(64), u64::MAX);
    }
}
