//! Just enough ELF to refuse files the dynamic loader should never see.

/// What is wrong with a file that is not a loadable shared object for this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ElfProblem {
    /// Empty, not ELF, not a shared object, or truncated; the reason says which.
    NotElf(String),
    /// A shared object for another machine or word size.
    WrongMachine(String),
}

const ET_DYN: u16 = 3;

fn machine_name(m: u16) -> String {
    match m {
        3 => "x86 (i386)".to_owned(),
        8 => "mips".to_owned(),
        20 => "powerpc".to_owned(),
        21 => "powerpc64".to_owned(),
        22 => "s390".to_owned(),
        40 => "arm".to_owned(),
        62 => "x86_64".to_owned(),
        183 => "aarch64".to_owned(),
        243 => "risc-v".to_owned(),
        258 => "loongarch".to_owned(),
        other => format!("machine {other}"),
    }
}

/// The ELF machine number of the running host.
pub(crate) fn host_machine() -> u16 {
    if cfg!(target_arch = "x86_64") {
        62
    } else if cfg!(target_arch = "aarch64") {
        183
    } else if cfg!(target_arch = "riscv64") {
        243
    } else if cfg!(target_arch = "x86") {
        3
    } else if cfg!(target_arch = "arm") {
        40
    } else {
        0
    }
}

/// How many bytes [`check_header`] needs to see (the 64-bit ELF header).
pub(crate) const HEADER_LEN: usize = 64;

/// Checks that `bytes` is a complete ELF shared object for this machine.
pub(crate) fn check(bytes: &[u8]) -> Result<(), ElfProblem> {
    check_header(bytes, bytes.len() as u64)
}

/// Checks the ELF header at the start of a file of `file_len` bytes (`header` may be just the first
/// [`HEADER_LEN`] bytes): a shared object for this machine whose header tables lie inside the file.
pub(crate) fn check_header(bytes: &[u8], file_len: u64) -> Result<(), ElfProblem> {
    if bytes.is_empty() {
        return Err(ElfProblem::NotElf("empty file, not an ELF shared object".to_owned()));
    }
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Err(ElfProblem::NotElf("not an ELF shared object (bad magic)".to_owned()));
    }
    let class64 = match bytes.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err(ElfProblem::NotElf("not an ELF shared object (bad class)".to_owned())),
    };
    let little = match bytes.get(5) {
        Some(1) => true,
        Some(2) => false,
        _ => return Err(ElfProblem::NotElf("not an ELF shared object (bad byte order)".to_owned())),
    };
    let header_len = if class64 { 64 } else { 52 };
    if bytes.len() < header_len {
        return Err(ElfProblem::NotElf(format!("truncated ELF file ({file_len} bytes, header needs {header_len})")));
    }
    let u16_at = |o: usize| {
        let b = [bytes[o], bytes[o + 1]];
        if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    let u64_at = |o: usize, wide: bool| -> u64 {
        if wide {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            if little {
                u64::from_le_bytes(b)
            } else {
                u64::from_be_bytes(b)
            }
        } else {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[o..o + 4]);
            u64::from(if little { u32::from_le_bytes(b) } else { u32::from_be_bytes(b) })
        }
    };
    let e_type = u16_at(16);
    if e_type != ET_DYN {
        let what = match e_type {
            1 => "a relocatable object file",
            2 => "an executable",
            4 => "a core dump",
            _ => "an ELF file of unknown type",
        };
        return Err(ElfProblem::NotElf(format!("{what}, not a shared object")));
    }
    let machine = u16_at(18);
    let host_class64 = cfg!(target_pointer_width = "64");
    let host_little = cfg!(target_endian = "little");
    if machine != host_machine() || class64 != host_class64 || little != host_little {
        return Err(ElfProblem::WrongMachine(format!(
            "ELF shared object for {} ({}-bit), this host is {} ({}-bit)",
            machine_name(machine),
            if class64 { 64 } else { 32 },
            machine_name(host_machine()),
            if host_class64 { 64 } else { 32 },
        )));
    }
    // Section headers sit at the end of a linked file: a cut file loses them first.
    let (shoff, shentsize, shnum) = if class64 {
        (u64_at(0x28, true), u16_at(0x3A), u16_at(0x3C))
    } else {
        (u64_at(0x20, false), u16_at(0x2E), u16_at(0x30))
    };
    // Program headers are what the loader maps; they must be inside the file too.
    let (phoff, phentsize, phnum) = if class64 {
        (u64_at(0x20, true), u16_at(0x36), u16_at(0x38))
    } else {
        (u64_at(0x1C, false), u16_at(0x2A), u16_at(0x2C))
    };
    let len = file_len;
    let ph_end = phoff.saturating_add(u64::from(phentsize) * u64::from(phnum));
    let sh_end = shoff.saturating_add(u64::from(shentsize) * u64::from(shnum));
    if ph_end > len || (shnum > 0 && sh_end > len) {
        return Err(ElfProblem::NotElf(format!(
            "truncated ELF shared object ({len} bytes, headers say at least {})",
            ph_end.max(sh_end)
        )));
    }
    Ok(())
}

/// Whether the file's dynamic symbol table defines `name` (an exported symbol), read without loading it.
/// `None` when the table cannot be read (the loader then decides).
pub(crate) fn defines_dynamic_symbol(bytes: &[u8], name: &str) -> Option<bool> {
    // Only the native layout is inspected: `check` has already refused anything else.
    if !cfg!(target_pointer_width = "64") || !cfg!(target_endian = "little") || bytes.len() < 64 {
        return None;
    }
    let rd = |o: usize, n: usize| -> Option<u64> {
        let s = bytes.get(o..o.checked_add(n)?)?;
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(s);
        Some(u64::from_le_bytes(b))
    };
    let shoff = usize::try_from(rd(0x28, 8)?).ok()?;
    let shentsize = usize::try_from(rd(0x3A, 2)?).ok()?;
    let shnum = usize::try_from(rd(0x3C, 2)?).ok()?;
    const SHT_DYNSYM: u64 = 11;
    for i in 0..shnum {
        let sh = shoff.checked_add(i.checked_mul(shentsize)?)?;
        if rd(sh + 4, 4)? != SHT_DYNSYM {
            continue;
        }
        let sym_off = usize::try_from(rd(sh + 0x18, 8)?).ok()?;
        let sym_size = usize::try_from(rd(sh + 0x20, 8)?).ok()?;
        let link = usize::try_from(rd(sh + 0x28, 4)?).ok()?;
        let entsize = usize::try_from(rd(sh + 0x38, 8)?).ok()?.max(24);
        let str_sh = shoff.checked_add(link.checked_mul(shentsize)?)?;
        let str_off = usize::try_from(rd(str_sh + 0x18, 8)?).ok()?;
        let str_size = usize::try_from(rd(str_sh + 0x20, 8)?).ok()?;
        let strtab = bytes.get(str_off..str_off.checked_add(str_size)?)?;
        for s in 0..sym_size / entsize {
            let e = sym_off.checked_add(s.checked_mul(entsize)?)?;
            let name_idx = usize::try_from(rd(e, 4)?).ok()?;
            let shndx = rd(e + 6, 2)?;
            if shndx == 0 {
                continue; // undefined: imported, not exported
            }
            let rest = strtab.get(name_idx..)?;
            let end = rest.iter().position(|&b| b == 0)?;
            if &rest[..end] == name.as_bytes() {
                return Some(true);
            }
        }
        return Some(false);
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_elf() {
        assert!(matches!(check(b""), Err(ElfProblem::NotElf(m)) if m.starts_with("empty")));
        assert!(matches!(check(b"hello world"), Err(ElfProblem::NotElf(m)) if m.contains("bad magic")));
        assert!(matches!(check(b"\x7fELF\x02\x01"), Err(ElfProblem::NotElf(m)) if m.contains("truncated")));
    }

    #[test]
    fn accepts_own_executable_machine_but_not_its_type() {
        let exe = std::fs::read(std::env::current_exe().expect("current exe")).expect("read exe");
        // Test binaries are position-independent executables: ET_DYN too, so this passes the checks.
        let r = check(&exe);
        assert!(r.is_ok() || matches!(r, Err(ElfProblem::NotElf(ref m)) if m.contains("executable")), "{r:?}");
    }
}
