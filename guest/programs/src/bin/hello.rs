//! `hello`: greets on the serial console from every vCPU, one after the other so lines do not
//! interleave, and ends with code 0.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use guest_rt::{Args, BootInfo, Text};

/// Whose turn it is to print.
static TURN: AtomicU64 = AtomicU64::new(0);

guest_rt::entry!(main, guest_rt::guests::HELLO);

fn main(boot: &BootInfo, _args: &Args) -> u64 {
    while TURN.load(Ordering::Acquire) != boot.vcpu_index {
        core::hint::spin_loop();
    }
    Text::new()
        .s("Hello from vCPU ")
        .dec(boot.vcpu_index)
        .s(" of ")
        .dec(boot.vcpu_count)
        .s(" (")
        .dec(boot.ram_size >> 20)
        .s(" MiB of guest RAM)")
        .serial_line();
    TURN.fetch_add(1, Ordering::Release);
    0
}
