//! Guest memory: the host mapping of guest RAM.

mod ram;

pub use ram::{GuestRam, HostAddr, RamError};
