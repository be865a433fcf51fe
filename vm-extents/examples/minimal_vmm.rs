//! A minimal VMM on `vm-extents` and the rust-vmm crates, nothing else. Guest RAM is two
//! regions, each its own memslot: MEMORY_MIB at guest address 0 and 4 MiB at 3 GiB, with the
//! gap between them (where an x86 VMM would put its PCI hole) left unbacked. One vCPU in
//! flat 32-bit protected mode writes the first word of every 4 KiB page of both (above 1 MiB
//! in the low one); the crate's userfaultfd handlers serve each first touch with zeroes, and
//! its collapse thread promotes the populated extents to 2 MiB pages. The VMM then checks
//! every word through the crate's `vm-memory` view and prints what the manager did.
//!
//! `cargo run --release -p vm-extents --example minimal_vmm [MEMORY_MIB]` (default 16).

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_segment;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_extents::{CollapseConfig, EXTENT_SIZE, Memory, MemoryConfig, PAGE_SIZE, PageSourceKind};
use vm_memory::{Bytes, GuestAddress};

/// Where the guest's code goes.
const CODE: u64 = 0x1000;
/// The first page the guest writes in the low region; everything below is the VMM's.
const LOW_DATA: u64 = 1 << 20;
/// The high region: 4 MiB at 3 GiB.
const HIGH: (u64, u64) = (3 << 30, 4 << 20);

/// The guest: `for (p = edi; p < esi; p += 4096) *p = p; hlt`, in 32-bit code.
const GUEST: [u8; 13] = [
    0x89, 0x3f, // loop: mov [edi], edi
    0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add edi, 4096
    0x39, 0xf7, // cmp edi, esi
    0x72, 0xf4, // jb loop
    0xf4, // hlt
];

/// A flat 4 GiB segment: code (`type` 0xb, execute/read) or data (0x3, read/write).
fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    }
}

/// Puts the vCPU in flat protected mode (no paging) at `CODE`, to write `[from, to)`.
fn boot(vcpu: &VcpuFd, from: u64, to: u64) -> Result<(), Box<dyn Error>> {
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs = flat(0x8, 0xb);
    (sregs.ds, sregs.es, sregs.ss) = (flat(0x10, 0x3), flat(0x10, 0x3), flat(0x10, 0x3));
    sregs.cr0 |= 1; // PE
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    (regs.rip, regs.rflags, regs.rdi, regs.rsi) = (CODE, 2, from, to);
    vcpu.set_regs(&regs)?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("minimal_vmm: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let mib: u64 = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|_| format!("MEMORY_MIB {arg:?} is not a whole number of MiB"))?,
        None => 16,
    };
    let low = mib << 20;
    if low > 3 << 30 {
        return Err(
            format!("MEMORY_MIB {mib} is too large: the low region ends below 3 GiB").into(),
        );
    }
    let regions = [(GuestAddress(0), low), (GuestAddress(HIGH.0), HIGH.1)];
    let config = MemoryConfig::builder_for_regions(&regions)
        .source(PageSourceKind::Zero)
        .collapse(Some(CollapseConfig::default()))
        .build()?;
    let mut memory = Memory::new(config)?;
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    // The VM fd is made after the memory, so it (and the memslots) is dropped first.
    let vm = kvm.create_vm()?;
    // SAFETY: `vm` is declared after `memory`, so it is dropped (and the memslots with it)
    // before guest RAM is unmapped.
    unsafe { memory.ram().register(&vm, 0)? };
    memory
        .ram()
        .view()
        .write_slice(&GUEST, GuestAddress(CODE))?;
    memory.start(Arc::new(|what| {
        eprintln!("minimal_vmm: memory failed: {what}")
    }))?;

    let mut vcpu = vm.create_vcpu(0)?;
    let ranges = [(LOW_DATA, low), (HIGH.0, HIGH.0 + HIGH.1)];
    let started = Instant::now();
    for &(from, to) in &ranges {
        boot(&vcpu, from, to)?;
        match vcpu.run()? {
            VcpuExit::Hlt => {}
            exit => return Err(format!("the guest stopped with {exit:?}, not HLT").into()),
        }
    }
    let ran = started.elapsed();

    let view = memory.ram().view();
    let (mut pages, mut wrong) = (0, 0);
    for &(from, to) in &ranges {
        for page in (from..to).step_by(PAGE_SIZE as usize) {
            pages += 1;
            if view.read_obj::<u32>(GuestAddress(page))? != page as u32 {
                wrong += 1;
            }
        }
    }
    // Give the collapse thread a moment to finish the extents the guest filled.
    let extents = (low + HIGH.1) / EXTENT_SIZE;
    let deadline = Instant::now() + Duration::from_secs(30);
    while memory.counts()?.huge < extents && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = memory.report()?;
    println!(
        "guest wrote {pages} pages in two regions in {ran:.2?}, {wrong} wrong; {} faults served \
         by the handler; {} of {extents} extents now 2 MiB pages ({} collapsed, write lock \
         p99 {} ns)",
        report.faults.stats.served.get(),
        report.memory.extents.counts.huge,
        report.collapse.stats.pages_collapsed.get(),
        report.collapse.stats.write_lock_ns.percentiles().p99,
    );
    drop(vcpu);
    drop(vm);
    memory.teardown();
    if wrong > 0 {
        return Err(format!("{wrong} pages lost the guest's write").into());
    }
    Ok(())
}
