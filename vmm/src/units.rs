//! Units the VMM is configured in: sizes in bytes with `K`/`M`/`G` suffixes. A leaf module:
//! it imports nothing of the crate, so everything may use it.

use std::fmt;
use std::str::FromStr;

/// A size in bytes, written with an optional `K`, `M` or `G` suffix (powers of 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = guest_abi::parse_size(s.trim().as_bytes()).ok_or_else(|| {
            if well_formed_size(s.trim()) {
                format!("invalid size {s:?}: too large (sizes are at most 16 EiB, 2^64 bytes)")
            } else {
                format!(
                    "invalid size {s:?}: expected a whole number of bytes with an optional K, M \
                     or G suffix, such as 512M or 2G"
                )
            }
        })?;
        if bytes == 0 {
            return Err(format!("invalid size {s:?}: must be greater than zero"));
        }
        Ok(ByteSize(bytes))
    }
}

/// Whether `s` is written as a size (digits and an optional suffix, or `0x` and hex digits),
/// whatever its value: a well-formed size that does not parse is too large.
fn well_formed_size(s: &str) -> bool {
    if let Some(hex) = s.strip_prefix("0x") {
        return !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    let digits = s.strip_suffix(['k', 'K', 'm', 'M', 'g', 'G']).unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        match () {
            _ if b >= 1 << 30 && b.is_multiple_of(1 << 30) => write!(f, "{}G", b >> 30),
            _ if b >= 1 << 20 && b.is_multiple_of(1 << 20) => write!(f, "{}M", b >> 20),
            _ if b >= 1 << 10 && b.is_multiple_of(1 << 10) => write!(f, "{}K", b >> 10),
            _ => write!(f, "{b}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_name_bad_values() {
        assert_eq!("64M".parse(), Ok(ByteSize(64 << 20)));
        assert_eq!("2g".parse(), Ok(ByteSize(2 << 30)));
        assert_eq!("4096".parse(), Ok(ByteSize(4096)));
        for bad in ["", "abc", "12X", "-4M", "1.5G", "99999999999G"] {
            let err = bad.parse::<ByteSize>().unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        assert!(
            "0".parse::<ByteSize>()
                .unwrap_err()
                .contains("greater than zero")
        );
        assert_eq!(ByteSize(3 << 20).to_string(), "3M");
        assert_eq!(ByteSize(4097).to_string(), "4097");
    }

    proptest::proptest! {
        /// Every size prints as something that parses back to it.
        #[test]
        fn sizes_print_as_they_parse(bytes in 1u64..(1 << 50)) {
            let shown = ByteSize(bytes).to_string();
            proptest::prop_assert_eq!(shown.parse::<ByteSize>(), Ok(ByteSize(bytes)));
        }
    }
}
