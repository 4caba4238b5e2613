//! `wisp image`: create and describe disk images without other tools.

use crate::config::MemSize;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use wisp_devices::disk::qcow2::{self, Format};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Create a qcow2 image (v3, 64 KiB clusters), empty or over a backing file.
    Create(CreateArgs),
    /// Show an image's format, virtual size, space used and backing chain.
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
    if a.json {
        let chain: Vec<_> = i
            .backing_chain
            .iter()
            .map(|(p, f)| serde_json::json!({"path": p, "format": f.to_string()}))
            .collect();
        let v = serde_json::json!({
            "path": a.path,
            "format": i.format.to_string(),
            "virtual_size": i.virtual_size,
            "allocated_bytes": i.allocated_bytes,
            "backing_chain": chain,
        });
        println!("{v:#}");
    } else {
        println!("image: {}", a.path.display());
        println!("format: {}", i.format);
        println!(
            "virtual size: {} ({} bytes)",
            MemSize(i.virtual_size),
            i.virtual_size
        );
        println!("allocated: {} bytes", i.allocated_bytes);
        for (depth, (p, f)) in i.backing_chain.iter().enumerate() {
            println!("backing file {}: {} ({f})", depth + 1, p.display());
        }
    }
    Ok(())
}
