//! What wisp adds to the kernel command line (`root=`, `noxsave`, `virtio_mmio.device=`) goes
//! to the kernel's arguments: before the first `--`, after which Linux hands every argument
//! to init (kernel/params.c `parse_args`). linux-loader's `Cmdline` is not used for this; see
//! ARCHITECTURE.md ("The kernel command line") for the lines it splits wrongly.

/// `line` with `args` added to the kernel's arguments, before any `--`.
pub fn with_kernel_args(line: &str, args: &[&str]) -> String {
    let (kernel, init) = match init_args_start(line) {
        Some(at) => line.split_at(at),
        None => (line, ""),
    };
    let mut out = kernel.trim_end().to_string();
    for arg in args.iter().chain([&init]).filter(|a| !a.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(arg);
    }
    out
}

/// Where the first `--` argument starts, as Linux splits arguments: at white space outside
/// double quotes.
fn init_args_start(line: &str) -> Option<usize> {
    let mut in_quote = false;
    let mut start = None;
    // A space past the end closes the last argument.
    for (i, b) in line.bytes().chain([b' ']).enumerate() {
        // Linux's isspace: space, \t, \n, \v, \f, \r.
        if matches!(b, b' ' | b'\t'..=b'\r') && !in_quote {
            match start.take() {
                Some(s) if &line[s..i] == "--" => return Some(s),
                _ => {}
            }
        } else {
            start.get_or_insert(i);
            in_quote ^= b == b'"';
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_arguments_go_before_init_arguments() {
        let added = |line: &str| with_kernel_args(line, &["root=/dev/vda rw"]);
        assert_eq!(added("console=ttyS0"), "console=ttyS0 root=/dev/vda rw");
        assert_eq!(
            added("console=ttyS0 -- single"),
            "console=ttyS0 root=/dev/vda rw -- single"
        );
        // The cases linux-loader's Cmdline::try_from (which looks for " -- ") misses.
        assert_eq!(added("-- single"), "root=/dev/vda rw -- single");
        assert_eq!(added("quiet --"), "quiet root=/dev/vda rw --");
        assert_eq!(added("quiet\t--\tx"), "quiet root=/dev/vda rw --\tx");
        // A `--` inside double quotes or inside a word is not the separator.
        assert_eq!(
            added("a=\"x -- y\" b--c"),
            "a=\"x -- y\" b--c root=/dev/vda rw"
        );
        assert_eq!(
            with_kernel_args("", &["noxsave", "virtio_mmio.device=4K@0xd0000000:5"]),
            "noxsave virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(with_kernel_args("quiet -- x", &[]), "quiet -- x");
    }
}
