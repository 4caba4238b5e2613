//! Linux tap devices (`/dev/net/tun`, IFF_TAP) carrying a virtio-net header per frame.
//!
//! A [`Tap`] is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and is non-blocking: every
//! frame read or written starts with a `virtio_net_hdr` whose size is set by
//! [`Tap::set_vnet_hdr_size`], and the kernel does checksum and segmentation work for the
//! offloads enabled with [`Tap::set_offload`] (Documentation/networking/tuntap.rst).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Longest interface name: IFNAMSIZ (16) including the NUL.
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// TUNSETOFFLOAD bits (linux/if_tun.h).
pub mod offload {
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
}

const TUN_PATH: &str = "/dev/net/tun";
/// Not used by modern kernels (every tap has a single qdisc queue), accepted for
/// compatibility.
const IFF_ONE_QUEUE: libc::c_short = 0x2000;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {name:?} is {len} bytes; an interface name has at most {MAX_NAME_LEN}")]
    NameTooLong { name: String, len: usize },
    #[error("tap name {name:?} is not a valid interface name (empty, \".\", \"..\", or contains '/', ':', NUL or white space)")]
    InvalidName { name: String },
    #[error("cannot open tap {name:?}: {TUN_PATH} does not exist (is the tun module loaded? `modprobe tun`)")]
    NoTunDevice { name: String },
    #[error("cannot open tap {name:?}: permission denied on {TUN_PATH} or for the interface (wisp needs CAP_NET_ADMIN, or a persistent tap owned by its user): {source}")]
    PermissionDenied { name: String, source: io::Error },
    #[error("cannot open tap {name:?}: it is busy (another process has it open)")]
    Busy { name: String },
    #[error(
        "cannot open tap {name:?}: an interface of that name exists and is not a single-queue tap"
    )]
    NotATap { name: String },
    #[error("cannot open tap {name:?}: {source}")]
    Open { name: String, source: io::Error },
    #[error("the fd handed over as a tap is not one: TUNGETIFF failed: {source}")]
    NotATapFd { source: io::Error },
    #[error("tap {name:?} handed over as an fd lacks flags {missing:#x} (needs IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)")]
    WrongFlags { name: String, missing: i32 },
    #[error("tap {name:?}: cannot make the fd non-blocking: {source}")]
    NonBlocking { name: String, source: io::Error },
    #[error("tap {name:?}: TUNSETVNETHDRSZ {size} failed: {source}")]
    SetVnetHdrSize {
        name: String,
        size: i32,
        source: io::Error,
    },
    #[error("tap {name:?}: TUNSETOFFLOAD {flags:#x} failed: {source}")]
    SetOffload {
        name: String,
        flags: u32,
        source: io::Error,
    },
    #[error("tap {name:?}: cannot set MTU {mtu}: {source}")]
    SetMtu {
        name: String,
        mtu: u16,
        source: io::Error,
    },
}

/// struct ifreq with the flags member of its union (linux/if.h); 40 bytes on x86_64.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> IfReq {
        IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }
}

/// `struct ifreq` with its `ifr_mtu` member.
#[repr(C)]
struct IfReqMtu {
    name: [u8; libc::IFNAMSIZ],
    mtu: libc::c_int,
    _pad: [u8; 20],
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

fn check_name(name: &str) -> Result<(), TapError> {
    if name.len() > MAX_NAME_LEN {
        return Err(TapError::NameTooLong {
            name: name.to_owned(),
            len: name.len(),
        });
    }
    // The kernel's dev_valid_name().
    if name.is_empty()
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        return Err(TapError::InvalidName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

impl Tap {
    /// Opens the tap `name` in the calling thread's network namespace, creating it if it
    /// does not exist (a created tap is not persistent: it goes away when the fd closes).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        let path = CString::new(TUN_PATH).expect("no NUL in a constant");
        // SAFETY: a valid C string; the result is checked.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_owned();
            return Err(match source.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    TapError::NoTunDevice { name }
                }
                Some(libc::EACCES) | Some(libc::EPERM) => {
                    TapError::PermissionDenied { name, source }
                }
                _ => TapError::Open { name, source },
            });
        }
        // SAFETY: `raw` is a freshly opened fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let mut req = IfReq::new();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // 0x5002: fits a c_short.
        #[allow(clippy::cast_possible_truncation)]
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        req.flags = flags | IFF_ONE_QUEUE;
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_owned();
            return Err(match source.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy { name },
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    TapError::PermissionDenied { name, source }
                }
                Some(libc::EINVAL) => TapError::NotATap { name },
                _ => TapError::Open { name, source },
            });
        }
        Ok(Tap {
            fd,
            name: name.to_owned(),
        })
    }

    /// Takes a tap fd opened by someone else (e.g. a node agent). It must have been set up
    /// with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; it is made non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let mut req = IfReq::new();
        // SAFETY: TUNGETIFF writes a struct ifreq, which `req` is.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) };
        if r < 0 {
            return Err(TapError::NotATapFd {
                source: io::Error::last_os_error(),
            });
        }
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        let want = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let missing = want & !i32::from(req.flags);
        if missing != 0 {
            return Err(TapError::WrongFlags { name, missing });
        }
        // SAFETY: F_GETFL/F_SETFL on an fd we own.
        let ok = unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            fl >= 0 && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) >= 0
        };
        if !ok {
            return Err(TapError::NonBlocking {
                name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap { fd, name })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size of the virtio-net header in front of every frame (TUNSETVNETHDRSZ): 12 for
    /// `virtio_net_hdr_v1` (VIRTIO_F_VERSION_1 or MRG_RXBUF), 10 for the legacy header.
    pub fn set_vnet_hdr_size(&self, size: i32) -> Result<(), TapError> {
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if r < 0 {
            return Err(TapError::SetVnetHdrSize {
                name: self.name.clone(),
                size,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Sets the interface's MTU (SIOCSIFMTU), so the host end takes the frames a guest told
    /// of that MTU sends.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        let err = |source| TapError::SetMtu {
            name: self.name.clone(),
            mtu,
            source,
        };
        // SAFETY: a plain socket call; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReqMtu {
            name: [0; libc::IFNAMSIZ],
            mtu: libc::c_int::from(mtu),
            _pad: [0; 20],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: SIOCSIFMTU reads a struct ifreq, which `req` is laid out as.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &req) };
        if r < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The offloads the reader of this tap handles (TUNSETOFFLOAD, [`offload`] bits): the
    /// kernel may then hand it frames with partial checksums or GSO frames of those kinds.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(TapError::SetOffload {
                name: self.name.clone(),
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (with its virtio-net header). A frame longer than `buf` is cut,
    /// and the returned length is the frame's full length.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (virtio-net header first) gathered from `iovs`.
    ///
    /// # Safety
    /// Each iovec must describe memory valid for reads for the duration of the call.
    pub unsafe fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let cnt = libc::c_int::try_from(iovs.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: the caller guarantees the iovecs.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iovs.as_ptr(), cnt) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (virtio-net header first) from `buf`.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `buf` is valid for reads during the call.
        unsafe { self.writev(&[iov]) }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
