//! x86_64 boot state: identity page tables, the GDT, and the registers that enter a vCPU
//! directly in 64-bit long mode. Pure functions of the RAM size where possible, so the layout
//! is unit-tested without KVM.

use guest_abi::layout::{
    EXTENT_SIZE, GDT_ADDR, PAGE_SIZE, PD_BASE, PDPT_ADDR, PML4_ADDR, STACK_SIZE, STACKS_BASE,
};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PDE_HUGE: u64 = 1 << 7;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;

/// How far the identity map reaches: RAM rounded up to the next GiB. The part above RAM is
/// mapped too, so that a guest access there is an MMIO exit the VMM can answer rather than a
/// page fault the guest has no handler for.
pub fn mapped_size(ram_size: u64) -> u64 {
    ram_size.next_multiple_of(1 << 30)
}

/// The page-table pages for `ram_size` bytes of RAM: `(guest address, 4 KiB page contents)`.
/// PML4 → one PDPT → one page directory per GiB, every entry a 2 MiB identity page.
pub fn page_tables(ram_size: u64) -> Vec<(u64, Vec<u8>)> {
    let gigs = mapped_size(ram_size) >> 30;
    let entry = |table: &mut Vec<u8>, i: u64, value: u64| {
        let at = (i * 8) as usize;
        table[at..at + 8].copy_from_slice(&value.to_le_bytes());
    };
    let mut pml4 = vec![0u8; PAGE_SIZE as usize];
    entry(&mut pml4, 0, PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE);
    let mut pdpt = vec![0u8; PAGE_SIZE as usize];
    let mut tables = Vec::with_capacity(2 + gigs as usize);
    for g in 0..gigs {
        let pd_addr = PD_BASE + g * PAGE_SIZE;
        entry(&mut pdpt, g, pd_addr | PTE_PRESENT | PTE_WRITABLE);
        let mut pd = vec![0u8; PAGE_SIZE as usize];
        for i in 0..512 {
            let phys = (g << 30) + i * EXTENT_SIZE;
            entry(&mut pd, i, phys | PTE_PRESENT | PTE_WRITABLE | PDE_HUGE);
        }
        tables.push((pd_addr, pd));
    }
    tables.push((PML4_ADDR, pml4));
    tables.push((PDPT_ADDR, pdpt));
    tables
}

/// The GDT: null, 64-bit code, flat data.
pub fn gdt() -> [u8; 24] {
    let mut out = [0u8; 24];
    out[8..16].copy_from_slice(&GDT_CODE64.to_le_bytes());
    out[16..24].copy_from_slice(&GDT_DATA.to_le_bytes());
    out
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Sets the special registers for long mode with paging on, on top of what KVM reported.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    sregs.cs = segment(CODE_SELECTOR, true);
    let data = segment(DATA_SELECTOR, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 23;
    // No IDT: any exception escalates to a triple fault, which the VMM reports.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// The general registers at entry: `rip` at the program's entry, `rdi` at this vCPU's boot
/// block, `rsp` at the top of its own stack as if `_start` had just been called.
pub fn entry_regs(entry: u64, boot_info: u64, vcpu_index: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rdi: boot_info,
        rsp: stack_top(vcpu_index) - 8,
        rflags: 0x2,
        ..Default::default()
    }
}

/// One past the highest byte of vCPU `index`'s stack (16-byte aligned).
pub fn stack_top(index: u64) -> u64 {
    STACKS_BASE + (index + 1) * STACK_SIZE
}

/// The model-specific registers a snapshot saves (those of them KVM has): what a long-mode
/// guest may have set, and the TSC, so that its clock goes on from where it paused.
pub const SAVED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// x87 and SSE control words at their reset values, so compiled Rust code can use SSE.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_entry(page: &[u8], i: u64) -> u64 {
        let at = (i * 8) as usize;
        u64::from_le_bytes(page[at..at + 8].try_into().unwrap())
    }

    /// Walks the tables like the MMU does for a 2 MiB mapping.
    fn translate(tables: &[(u64, Vec<u8>)], va: u64) -> Option<u64> {
        let page = |addr: u64| tables.iter().find(|(a, _)| *a == addr).map(|(_, p)| p);
        let pml4e = read_entry(page(PML4_ADDR)?, (va >> 39) & 511);
        let pdpte = read_entry(page(pml4e & !0xfff)?, (va >> 30) & 511);
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        let pde = read_entry(page(pdpte & !0xfff)?, (va >> 21) & 511);
        assert_ne!(pde & PDE_HUGE, 0);
        Some((pde & !(EXTENT_SIZE - 1) & ((1 << 52) - 1)) | (va & (EXTENT_SIZE - 1)))
    }

    #[test]
    fn identity_maps_all_ram_with_2m_pages() {
        for ram in [8 << 20, 1 << 30, (1 << 30) + (2 << 20), 5 << 30] {
            let tables = page_tables(ram);
            for va in [0, 0x1234, 4 << 20, ram - 1, ram / 2 + 0x777] {
                assert_eq!(translate(&tables, va), Some(va), "ram {ram:#x} va {va:#x}");
            }
            // Up to the GiB boundary for MMIO, and nothing beyond.
            assert_eq!(
                translate(&tables, mapped_size(ram) - 1),
                Some(mapped_size(ram) - 1)
            );
            assert_eq!(translate(&tables, mapped_size(ram)), None);
        }
    }

    #[test]
    fn tables_fit_their_reserved_area() {
        let tables = page_tables(guest_abi::layout::MAX_RAM);
        for (addr, page) in &tables {
            assert_eq!(page.len() as u64, PAGE_SIZE);
            assert!(*addr >= PML4_ADDR && addr + PAGE_SIZE <= STACKS_BASE);
        }
    }

    #[test]
    fn stacks_are_aligned_and_disjoint() {
        assert_eq!(stack_top(0) % 16, 0);
        assert_eq!(stack_top(1) - stack_top(0), STACK_SIZE);
        let regs = entry_regs(0x400000, 0x10000, 3);
        assert_eq!((regs.rsp + 8) % 16, 0);
        assert_eq!(regs.rdi, 0x10000);
    }
}
