//! `wisp image`: create and describe disk images without other tools.

use crate::config::MemSize;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use wisp_devices::disk::qcow2::{self, Format, OpenVerdict};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Create a qcow2 image (v3, 64 KiB clusters), empty or over a backing file.
    Create(CreateArgs),
    /// Show an image's format, sizes, qcow2 features, backing chain and whether wisp opens
    /// it (images wisp refuses are described, with the reason).
    Info(InfoArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Virtual size, e.g. 10G [default: the backing file's size].
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Backing file: unwritten clusters read from it; it is never written.
    #[arg(long, value_name = "PATH")]
    pub backing: Option<PathBuf>,
    /// Format of the backing file, recorded in the image [default: probed now].
    #[arg(long, value_name = "raw|qcow2", requires = "backing")]
    pub backing_format: Option<String>,
    /// Cluster size, a power of two from 512 to 2M [default: 64K].
    #[arg(long, value_name = "SIZE")]
    pub cluster_size: Option<String>,
    /// The image to create; an existing file is never overwritten.
    pub path: PathBuf,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Qcow2(#[from] qcow2::Error),
    #[error("--{flag}: {reason}")]
    Arg { flag: &'static str, reason: String },
    #[error("{path}: already exists; wisp image create never overwrites a file")]
    Exists { path: PathBuf },
    #[error("give --size or --backing")]
    NoSize,
}

pub fn run(cmd: &ImageCommand) -> Result<(), ImageError> {
    match cmd {
        ImageCommand::Create(a) => create(a),
        ImageCommand::Info(a) => info(a),
    }
}

fn size_arg(flag: &'static str, v: &Option<String>) -> Result<Option<u64>, ImageError> {
    v.as_ref()
        .map(|s| {
            s.parse::<MemSize>()
                .map(|m| m.0)
                .map_err(|e| ImageError::Arg {
                    flag,
                    reason: e.to_string(),
                })
        })
        .transpose()
}

fn create(a: &CreateArgs) -> Result<(), ImageError> {
    if a.path.symlink_metadata().is_ok() {
        return Err(ImageError::Exists {
            path: a.path.clone(),
        });
    }
    let size = size_arg("size", &a.size)?;
    let cluster_size = size_arg("cluster-size", &a.cluster_size)?;
    if size.is_none() && a.backing.is_none() {
        return Err(ImageError::NoSize);
    }
    let backing = match &a.backing {
        None => None,
        Some(b) => {
            let format = match &a.backing_format {
                Some(f) => f.parse::<Format>().map_err(|reason| ImageError::Arg {
                    flag: "backing-format",
                    reason,
                })?,
                // Probing is safe here: the user names a file of their own, and the result
                // is recorded so that it is never probed again.
                None => qcow2::info(&resolve(&a.path, b))?.format,
            };
            Some((b.as_path(), format))
        }
    };
    qcow2::create(&a.path, size, cluster_size, backing)?;
    Ok(())
}

/// A relative backing path is relative to the new image's directory (as qcow2 records it).
fn resolve(image: &std::path::Path, backing: &std::path::Path) -> PathBuf {
    if backing.is_absolute() {
        backing.to_path_buf()
    } else {
        image
            .parent()
            .unwrap_or_else(|| std::path::Path::new("."))
            .join(backing)
    }
}

fn info(a: &InfoArgs) -> Result<(), ImageError> {
    let i = qcow2::info(&a.path)?;
    // Where each backing file really is, when a link or `..` makes it differ.
    let real = |p: &std::path::Path| std::fs::canonicalize(p).ok().filter(|r| r != p);
    let (verdict, reason) = match &i.open {
        OpenVerdict::ReadWrite => ("read-write", None),
        OpenVerdict::ReadOnly(r) => ("read-only only", Some(r.as_str())),
        OpenVerdict::Refused(r) => ("refused", Some(r.as_str())),
    };
    if a.json {
        let chain: Vec<_> = i
            .backing_chain
            .iter()
            .map(|(p, f)| {
                serde_json::json!({"path": p, "real_path": real(p).unwrap_or(p.clone()), "format": f.to_string()})
            })
            .collect();
        let mut v = serde_json::json!({
            "path": a.path,
            "format": i.format.to_string(),
            "virtual_size": i.virtual_size,
            "allocated_bytes": i.allocated_bytes,
            "backing_chain": chain,
            "wisp_opens": verdict,
            "reason": reason,
        });
        if let Some(f) = &i.qcow2 {
            v["qcow2"] = serde_json::json!({
                "compat": f.compat(),
                "cluster_size": f.cluster_size(),
                "refcount_bits": f.refcount_bits(),
                "compression": compression(f.compression_type),
                "dirty": f.dirty,
                "corrupt": f.corrupt,
                "lazy_refcounts": f.lazy_refcounts,
                "internal_snapshots": f.snapshots,
                "persistent_bitmaps": f.bitmaps,
                "backing_name": f.backing_name,
                "backing_format": f.backing_format,
            });
        }
        println!("{v:#}");
        return Ok(());
    }
    println!("image: {}", a.path.display());
    println!("format: {}", i.format);
    println!(
        "virtual size: {} ({} bytes)",
        MemSize(i.virtual_size),
        i.virtual_size
    );
    println!("allocated: {} bytes", i.allocated_bytes);
    if let Some(f) = &i.qcow2 {
        let opt = |v: Option<u64>| v.map_or("invalid".to_string(), |v| v.to_string());
        let yes = |b: bool| if b { "yes" } else { "no" };
        println!("compat: {} (qcow2 version {})", f.compat(), f.version);
        println!("cluster size: {}", opt(f.cluster_size()));
        println!("refcount bits: {}", opt(f.refcount_bits()));
        println!("compression: {}", compression(f.compression_type));
        println!("dirty: {}", yes(f.dirty));
        println!("corrupt: {}", yes(f.corrupt));
        println!("lazy refcounts: {}", yes(f.lazy_refcounts));
        println!("internal snapshots: {}", f.snapshots);
        if f.bitmaps != 0 {
            println!(
                "persistent bitmaps: {}{} (a read-write open by wisp drops them)",
                f.bitmaps,
                if f.bitmaps_valid { "" } else { ", stale" }
            );
        }
        if let Some(name) = &f.backing_name {
            let fmt = f.backing_format.as_deref().unwrap_or("not recorded");
            println!("backing file name: {name} (format {fmt}); a VM disk follows it only with backing_files=on or backing_dir=DIR");
        }
    }
    for (depth, (p, f)) in i.backing_chain.iter().enumerate() {
        match real(p) {
            Some(r) => println!(
                "backing file {}: {} ({f}), really {}",
                depth + 1,
                p.display(),
                r.display()
            ),
            None => println!("backing file {}: {} ({f})", depth + 1, p.display()),
        }
    }
    match reason {
        Some(r) => println!("wisp opens it: {verdict}: {r}"),
        None => println!("wisp opens it: {verdict}"),
    }
    Ok(())
}

fn compression(ty: u8) -> String {
    match ty {
        0 => "deflate".into(),
        1 => "zstd".into(),
        t => format!("unknown ({t})"),
    }
}
