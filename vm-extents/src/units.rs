//! How the manager's messages write sizes: in the largest of `G`, `M`, `K` (powers of 1024)
//! that divides them, else in bytes, as a VMM's size options are usually written.

use std::fmt;

/// A size in bytes, displayed as `2M`, `64G`, `4097`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        let (value, suffix) = [(30, "G"), (20, "M"), (10, "K")]
            .into_iter()
            .find(|&(shift, _)| b >= 1 << shift && b.is_multiple_of(1 << shift))
            .map_or((b, ""), |(shift, suffix)| (b >> shift, suffix));
        write!(f, "{value}{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::ByteSize;

    #[test]
    fn sizes_show_in_the_largest_unit_that_divides_them() {
        assert_eq!(ByteSize(3 << 20).to_string(), "3M");
        assert_eq!(ByteSize(64 << 30).to_string(), "64G");
        assert_eq!(ByteSize(4 << 10).to_string(), "4K");
        assert_eq!(ByteSize(4097).to_string(), "4097");
    }
}
