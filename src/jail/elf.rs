//! What a dynamically linked exec file needs inside the chroot: its ELF interpreter
//! (PT_INTERP) and the shared libraries of its DT_NEEDED entries, transitively, found in the
//! system library directories as the loader finds them without /etc/ld.so.cache. A
//! statically linked file (Firecracker's jailer requires one) needs nothing.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
/// Bounds on what is read from a file, so a strange one cannot make the jailer loop or
/// allocate without end.
const MAX_PHDRS: u16 = 256;
const MAX_DYN_ENTRIES: u64 = 4096;
const MAX_NAME: usize = 4096;
const MAX_LIBRARIES: usize = 128;

/// Where the x86_64 loader looks for a library when there is no ld.so.cache (Debian's
/// multiarch directories first).
const SEARCH_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

fn bad(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

fn read_at(f: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

struct Phdr {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// A NUL-terminated string at `offset`, at most MAX_NAME bytes.
fn string_at(f: &File, path: &Path, offset: u64) -> io::Result<String> {
    let mut buf = vec![0; MAX_NAME];
    let n = f.read_at(&mut buf, offset)?;
    let end = buf[..n]
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| bad(path, "unterminated string"))?;
    String::from_utf8(buf[..end].to_vec()).map_err(|_| bad(path, "a name is not UTF-8"))
}

/// The interpreter and the DT_NEEDED names of one ELF file; `None` if it is not a 64-bit
/// little-endian ELF.
fn dependencies(path: &Path) -> io::Result<Option<(Option<PathBuf>, Vec<String>)>> {
    let f = File::open(path)?;
    let ehdr = match read_at(&f, 0, 64) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return Ok(None);
    }
    let (phoff, phentsize, phnum) = (
        u64_at(&ehdr, 0x20),
        u16_at(&ehdr, 0x36),
        u16_at(&ehdr, 0x38),
    );
    if phentsize < 56 || phnum > MAX_PHDRS {
        return Err(bad(path, "unexpected program header table"));
    }
    let table = read_at(&f, phoff, usize::from(phentsize) * usize::from(phnum))?;
    let phdrs: Vec<Phdr> = table
        .chunks_exact(usize::from(phentsize))
        .map(|p| Phdr {
            kind: u32_at(p, 0),
            offset: u64_at(p, 8),
            vaddr: u64_at(p, 16),
            filesz: u64_at(p, 32),
        })
        .collect();
    let mut interp = None;
    if let Some(p) = phdrs.iter().find(|p| p.kind == PT_INTERP) {
        interp = Some(PathBuf::from(string_at(&f, path, p.offset)?));
    }
    let Some(dynamic) = phdrs.iter().find(|p| p.kind == PT_DYNAMIC) else {
        return Ok(Some((interp, Vec::new())));
    };
    let count = (dynamic.filesz / 16).min(MAX_DYN_ENTRIES);
    let entries = read_at(
        &f,
        dynamic.offset,
        usize::try_from(count * 16).map_err(|_| bad(path, "dynamic section too large"))?,
    )?;
    let mut strtab = None;
    let mut needed = Vec::new();
    for e in entries.chunks_exact(16) {
        match u64_at(e, 0) {
            DT_NULL => break,
            DT_NEEDED => needed.push(u64_at(e, 8)),
            DT_STRTAB => strtab = Some(u64_at(e, 8)),
            _ => {}
        }
    }
    if needed.is_empty() {
        return Ok(Some((interp, Vec::new())));
    }
    let strtab = strtab.ok_or_else(|| bad(path, "DT_NEEDED without DT_STRTAB"))?;
    // DT_STRTAB is an address: find the file offset through the loadable segment holding it.
    let seg = phdrs
        .iter()
        .find(|p| p.kind == PT_LOAD && strtab >= p.vaddr && strtab - p.vaddr < p.filesz)
        .ok_or_else(|| bad(path, "DT_STRTAB outside every loadable segment"))?;
    let base = strtab - seg.vaddr + seg.offset;
    let names = needed
        .into_iter()
        .map(|off| {
            let at = base
                .checked_add(off)
                .ok_or_else(|| bad(path, "DT_NEEDED offset overflows"))?;
            string_at(&f, path, at)
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok(Some((interp, names)))
}

fn find_library(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name)).filter(|p| p.is_file());
    }
    SEARCH_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Every file the loader opens to start `exec`, as the paths it opens them by (to be made
/// at the same paths inside the chroot). Empty for a static executable.
pub fn runtime_files(exec: &Path) -> io::Result<Vec<PathBuf>> {
    let Some((interp, names)) = dependencies(exec)? else {
        return Ok(Vec::new());
    };
    let Some(interp) = interp else {
        return Ok(Vec::new());
    };
    let mut files = vec![interp];
    let mut queue: Vec<String> = names;
    while let Some(name) = queue.pop() {
        let path = find_library(&name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} needs the shared library {name}, found in none of {}",
                    exec.display(),
                    SEARCH_DIRS.join(", ")
                ),
            )
        })?;
        if files.contains(&path) {
            continue;
        }
        if files.len() >= MAX_LIBRARIES {
            return Err(bad(
                exec,
                "needs more shared libraries than the jailer copies",
            ));
        }
        if let Some((_, more)) = dependencies(&path)? {
            queue.extend(more);
        }
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_needs_its_loader_and_libc() {
        // The test binary itself is linked like wisp.
        let files = runtime_files(&std::env::current_exe().unwrap()).unwrap();
        assert!(files[0].to_str().unwrap().contains("ld-linux"), "{files:?}");
        assert!(
            files.iter().any(|f| f.file_name().unwrap() == "libc.so.6"),
            "{files:?}"
        );
    }

    #[test]
    fn a_non_elf_file_needs_nothing() {
        let text = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        assert!(runtime_files(Path::new(text)).unwrap().is_empty());
        assert!(runtime_files(Path::new("/proc/self/status"))
            .unwrap()
            .is_empty());
    }
}
