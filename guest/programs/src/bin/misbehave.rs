//! `misbehave`: does one thing a real VMM must survive, chosen by
//! `kind=triple-fault|bad-ucall|unknown-port|serial-flood`.
//!
//! - `triple-fault`: raises an exception with no IDT, which escalates to a triple fault.
//! - `bad-ucall`: hands the host a ucall address outside guest RAM.
//! - `unknown-port`: reads and writes a port and an MMIO address no device claims; both reads
//!   must return all ones, and the guest then ends with code 0 (or 1 if they did not).
//! - `serial-flood`: writes `bytes=SIZE` (256K) to the serial console as fast as it can, then
//!   ends with code 0; the host must rate-limit it.
//! - `untouched-ucall`: hands the host a ucall in the last page of free RAM, which nobody has
//!   touched: the host's read of it is the page's first touch, a fault its own fault handler
//!   may have to serve. The page holds no valid ucall, so the host must end the vCPU (201)
//!   promptly, whatever serves the fault.
//!
//! - `print-flood`, `report-flood`: `count=N` (100000) print ucalls, or report ucalls each
//!   with a new key, as fast as it can, then ends with code 0; the host must bound both its
//!   output and what it keeps.
//! - `escapes`: prints terminal escape sequences on the serial console and in a ucall; the
//!   host must show them, not send them to the terminal.
//! - `bad-free`: reports a free range that runs past the end of guest RAM; the host must
//!   refuse the whole report, naming the range, and end the vCPU (201) with nothing freed.
//!
//! Without `kind=`, the guest triple-faults.
#![no_std]
#![no_main]

use core::arch::asm;
use guest_rt::{Args, BootInfo, Text, Ucall, inb, outb, serial_write};

guest_rt::entry!(main, guest_rt::guests::MISBEHAVE);

const UNCLAIMED_PORT: u16 = 0x2345;

fn main(boot: &BootInfo, args: &Args) -> u64 {
    match args.choice("kind") {
        "print-flood" => {
            let line = Ucall::print(b"flooding the host with print ucalls, line after line");
            for _ in 0..args.number("count") {
                guest_rt::ucall(&line);
            }
            0
        }
        "report-flood" => {
            for i in 0..args.number("count") {
                let key = Text::new().s("key-").dec(i);
                guest_rt::ucall(&Ucall::report(key.as_bytes(), i));
            }
            0
        }
        "escapes" => {
            serial_write(b"serial \x1b[2J\x1b]0;owned\x07 end\n");
            Text::new().s("ucall \x1b[31m red \x1b[0m end").print();
            0
        }
        "triple-fault" => {
            // SAFETY: deliberately faults; with a zero-length IDT the CPU shuts down.
            unsafe { asm!("ud2", options(nomem, nostack, noreturn)) }
        }
        "bad-free" => {
            let page = boot.free_start;
            // SAFETY: a page of free RAM this guest owns.
            unsafe { (page as *mut u64).write_volatile(0x5eed) };
            guest_rt::free(&[
                [page, guest_rt::layout::PAGE_SIZE],
                [boot.ram_size - 4096, 8192],
            ]);
            Text::new()
                .s("the host accepted a free range past the end of RAM")
                .print();
            2
        }
        "bad-ucall" => {
            // SAFETY: the `in` only exits to the host, which must reject the address.
            unsafe {
                asm!("in al, dx", in("dx") guest_abi::ports::UCALL, in("rdi") 1u64 << 50,
                     out("al") _, options(nomem, nostack));
            }
            Text::new()
                .s("the host accepted a ucall outside RAM")
                .print();
            2
        }
        "untouched-ucall" => {
            let page = boot.free_end - guest_rt::layout::PAGE_SIZE;
            // SAFETY: as for `bad-ucall`; the address is inside guest RAM this time.
            unsafe {
                asm!("in al, dx", in("dx") guest_abi::ports::UCALL, in("rdi") page,
                     out("al") _, options(nomem, nostack));
            }
            Text::new().s("the host accepted a ucall of zeroes").print();
            2
        }
        "unknown-port" => {
            outb(UNCLAIMED_PORT, 0x5a);
            let port = inb(UNCLAIMED_PORT);
            // The VMM maps the gap between the end of RAM and the next GiB as MMIO.
            let mmio = if !boot.ram_size.is_multiple_of(1 << 30) {
                // SAFETY: the address is mapped by the page tables but backed by no RAM: the
                // access exits to the host as MMIO.
                unsafe {
                    let p = boot.ram_size as *mut u32;
                    p.write_volatile(0x1234_5678);
                    p.read_volatile()
                }
            } else {
                u32::MAX
            };
            Text::new()
                .s("unclaimed port read ")
                .hex(port.into())
                .s(", unclaimed MMIO read ")
                .hex(mmio.into())
                .print();
            u64::from(port != 0xff || mmio != u32::MAX)
        }
        _ => {
            let total = args.number("bytes");
            let chunk = [b'#'; 4096];
            let mut sent = 0;
            while sent < total {
                let n = (total - sent).min(chunk.len() as u64);
                serial_write(&chunk[..n as usize]);
                sent += n;
            }
            serial_write(b"\n");
            0
        }
    }
}
