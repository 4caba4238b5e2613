#!/bin/bash
# Build wisp's Linux guest images from Debian 12 packages only.
#
#   images/build.sh [all|kernel|stock|initramfs|rootfs]...   (default: all)
#
# Outputs in images/out/ (git-ignored); see images/README.md. Idempotent: the
# test kernel and the stock kernel are cached outside the clone in
# ${WISP_IMAGE_CACHE:-/var/cache/wisp-images}; the initramfs and the rootfs
# take seconds and are rebuilt every time. Missing Debian packages are
# installed with apt-get when running as root.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT="$HERE/out"
BUILD="$OUT/build"
KSRC_TAR=/usr/src/linux-source-6.1.tar.xz
JOBS=${JOBS:-$(nproc)}
INIT_SCRIPT="$HERE/init/init"
FPUCHECK_SRC="$HERE/init/fpucheck.c"
VSOCKIO_SRC="$HERE/init/vsockio.c"
ROOTFS_SIZE_MB=${ROOTFS_SIZE_MB:-48}

log() { echo "build.sh: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

if [ -z "${WISP_IMAGE_CACHE:-}" ]; then
	WISP_IMAGE_CACHE=/var/cache/wisp-images
	if ! mkdir -p "$WISP_IMAGE_CACHE" 2>/dev/null || [ ! -w "$WISP_IMAGE_CACHE" ]; then
		WISP_IMAGE_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/wisp-images"
	fi
fi
CACHE="$WISP_IMAGE_CACHE"

# --- host packages --------------------------------------------------------------

PACKAGES=(linux-source-6.1 busybox-static build-essential bc bison flex libelf-dev
	libssl-dev dwarves cpio e2fsprogs lz4 xz-utils zstd patch binutils)

pkg_installed() {
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

ensure_packages() {
	local missing=() p
	for p in "${PACKAGES[@]}"; do
		pkg_installed "$p" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" -eq 0 ] || die "missing Debian packages (run as root or install): ${missing[*]}"
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends "${missing[@]}" ||
		{ apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; }
}

src_version() {
	dpkg-query -W -f='${Version}' linux-source-6.1
}

# usr/gen_init_cpio and scripts/extract-vmlinux from the kernel source, built
# once per source version (needed even when the kernel itself comes from the
# cache).
TOOLS=""
ensure_tools() {
	[ -n "$TOOLS" ] && return 0
	TOOLS="$CACHE/tools-$(src_version)"
	if [ ! -x "$TOOLS/gen_init_cpio" ] || [ ! -x "$TOOLS/extract-vmlinux" ]; then
		log "tools: extracting gen_init_cpio and extract-vmlinux from $KSRC_TAR"
		rm -rf "$TOOLS.tmp"
		mkdir -p "$TOOLS.tmp"
		tar -xaf "$KSRC_TAR" -C "$TOOLS.tmp" --strip-components=1 \
			linux-source-6.1/usr/gen_init_cpio.c linux-source-6.1/scripts/extract-vmlinux
		cc -O2 -o "$TOOLS.tmp/gen_init_cpio" "$TOOLS.tmp/usr/gen_init_cpio.c"
		cp "$TOOLS.tmp/scripts/extract-vmlinux" "$TOOLS.tmp/extract-vmlinux"
		chmod +x "$TOOLS.tmp/extract-vmlinux"
		rm -rf "$TOOLS"
		mv "$TOOLS.tmp" "$TOOLS"
	fi
}

# shellcheck source=kernel/kernel.sh
. "$HERE/kernel/kernel.sh"

# --- stock Debian cloud kernel -------------------------------------------------------

# Does this ELF carry XEN_ELFNOTE_PHYS32_ENTRY (type 18 = 0x12, owner "Xen")?
has_pvh_note() {
	readelf -n "$1" 2>/dev/null | awk '$1 == "Xen" && /0x00000012/ { found = 1 } END { exit !found }'
}

build_stock() {
	local pkg ver cached tmp deb vmlinuz
	pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends:/ { print $2; exit }')
	if [ -z "$pkg" ]; then
		apt-get update >/dev/null
		pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends:/ { print $2; exit }')
	fi
	[ -n "$pkg" ] || die "stock: cannot resolve linux-image-cloud-amd64's dependency"
	ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ { print $2 }')
	cached="$CACHE/stock-$pkg-$ver"
	if [ -f "$cached/vmlinuz" ] && [ -f "$cached/vmlinux" ]; then
		log "stock: cache hit $cached"
	else
		log "stock: fetching $pkg $ver"
		ensure_tools
		tmp="$BUILD/stock"
		rm -rf "$tmp"
		mkdir -p "$tmp"
		# apt-get download drops privileges to _apt if it can; let it write here.
		chmod 777 "$tmp"
		(cd "$tmp" && { apt-get download "$pkg=$ver" || { apt-get update && apt-get download "$pkg=$ver"; }; })
		deb=$(ls "$tmp"/*.deb)
		dpkg-deb -x "$deb" "$tmp/root"
		vmlinuz=$(ls "$tmp"/root/boot/vmlinuz-*)
		rm -rf "$cached.tmp"
		mkdir -p "$cached.tmp"
		cp "$vmlinuz" "$cached.tmp/vmlinuz"
		"$TOOLS/extract-vmlinux" "$vmlinuz" >"$cached.tmp/vmlinux"
		readelf -h "$cached.tmp/vmlinux" >/dev/null || die "stock: extract-vmlinux gave no ELF"
		basename "$vmlinuz" >"$cached.tmp/name"
		rm -rf "$cached"
		mv "$cached.tmp" "$cached"
		rm -rf "$tmp"
	fi
	cp "$cached/vmlinuz" "$OUT/stock-vmlinuz"
	cp "$cached/vmlinux" "$OUT/stock-vmlinux"
	if has_pvh_note "$OUT/stock-vmlinux"; then
		log "stock: $(cat "$cached/name"): the extracted vmlinux HAS a PVH note"
	else
		log "stock: $(cat "$cached/name"): the extracted vmlinux has NO PVH note"
	fi
}

# --- busybox user space ---------------------------------------------------------------

# Applet paths (bin/ls, sbin/ip, ...) except the ones /init replaces.
busybox_applets() {
	busybox --list-full | grep -vxE 'sbin/init|linuxrc|bin/busybox'
}

ROOT_DIRS=(bin sbin usr usr/bin usr/sbin proc sys dev mnt tmp root etc run var)

# fpucheck (images/init/fpucheck.c), a static test program: does the guest keep user
# space's vector registers across context switches (scenario fpu)? In the rootfs only: the
# kernel reads a disk on demand, while every byte of the initramfs costs unpacking time.
build_fpucheck() {
	cc -static -Os -s -Wall -o "$BUILD/fpucheck" "$FPUCHECK_SRC"
}

# vsockio (images/init/vsockio.c), byte streams over vsock or TCP (scenario vsock,
# scripts/bench/vsock.sh): busybox has no vsock tool. In the rootfs only, as fpucheck.
build_vsockio() {
	cc -static -Os -s -Wall -o "$BUILD/vsockio" "$VSOCKIO_SRC"
}

build_initramfs() {
	ensure_tools
	local list="$BUILD/initramfs.list.$$" d a
	mkdir -p "$BUILD"
	{
		for d in "${ROOT_DIRS[@]}"; do
			echo "dir /$d 0755 0 0"
		done
		echo "nod /dev/console 0600 0 0 c 5 1"
		echo "nod /dev/null 0666 0 0 c 1 3"
		echo "file /bin/busybox $(command -v busybox) 0755 0 0"
		while read -r a; do
			echo "slink /$a /bin/busybox 0777 0 0"
		done < <(busybox_applets)
		echo "file /init $INIT_SCRIPT 0755 0 0"
		echo "slink /sbin/init /init 0777 0 0"
	} >"$list"
	# Uncompressed on purpose: decompression is very slow when the guest
	# kernel runs interpreted (see README).
	"$TOOLS/gen_init_cpio" "$list" >"$OUT/initramfs.cpio.$$"
	mv "$OUT/initramfs.cpio.$$" "$OUT/initramfs.cpio"
	rm -f "$list"
	log "initramfs: $(stat -c %s "$OUT/initramfs.cpio") bytes"
}

build_rootfs() {
	local stage="$BUILD/rootfs.$$" d a
	rm -rf "$stage"
	mkdir -p "$stage"
	for d in "${ROOT_DIRS[@]}"; do
		mkdir -p "$stage/$d"
	done
	chmod 1777 "$stage/tmp"
	cp "$(command -v busybox)" "$stage/bin/busybox"
	while read -r a; do
		ln -sf /bin/busybox "$stage/$a"
	done < <(busybox_applets)
	install -m 0755 "$INIT_SCRIPT" "$stage/init"
	build_fpucheck
	install -m 0755 "$BUILD/fpucheck" "$stage/bin/fpucheck"
	build_vsockio
	install -m 0755 "$BUILD/vsockio" "$stage/bin/vsockio"
	ln -sf /init "$stage/sbin/init"
	# No device nodes: the kernel opens the console before mounting root and
	# CONFIG_DEVTMPFS_MOUNT mounts /dev on it.
	rm -f "$OUT/rootfs.ext4.$$"
	truncate -s "${ROOTFS_SIZE_MB}M" "$OUT/rootfs.ext4.$$"
	# Inode tables and journal zeroed here, not by the guest kernel's ext4lazyinit
	# thread in the background (interpreted on PVM, it slows every boot).
	mkfs.ext4 -q -F -L wisp-root -E root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0 -d "$stage" \
		"$OUT/rootfs.ext4.$$"
	mv "$OUT/rootfs.ext4.$$" "$OUT/rootfs.ext4"
	rm -rf "$stage"
	log "rootfs: $ROOTFS_SIZE_MB MiB ext4"
}

# --- main ----------------------------------------------------------------------

# One kernel build at a time per clone and per cache: concurrent runs would
# unpack over each other's kernel tree and race on the cache directory.
locked_build_kernel() {
	exec 8>"$OUT/.kernel.lock"
	if ! flock -n 8; then
		log "kernel: waiting for another build.sh in this clone ($OUT/.kernel.lock)"
		flock 8
	fi
	exec 9>"$CACHE/.kernel.lock"
	if ! flock -n 9; then
		log "kernel: waiting for another build.sh using $CACHE ($CACHE/.kernel.lock)"
		flock 9
	fi
	build_kernel
	exec 8>&- 9>&-
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(all)
for t in "${targets[@]}"; do
	case "$t" in
	all | kernel | stock | initramfs | rootfs) ;;
	*) die "unknown target '$t' (want all|kernel|stock|initramfs|rootfs)" ;;
	esac
done

ensure_packages
mkdir -p "$OUT" "$BUILD" "$CACHE"
for t in "${targets[@]}"; do
	case "$t" in
	all)
		locked_build_kernel
		build_stock
		build_initramfs
		build_rootfs
		;;
	kernel) locked_build_kernel ;;
	stock) build_stock ;;
	initramfs) build_initramfs ;;
	rootfs) build_rootfs ;;
	esac
done

echo "wisp guest images in $OUT (cache: $CACHE):"
for f in vmlinux bzImage kernel.config stock-vmlinuz stock-vmlinux initramfs.cpio rootfs.ext4; do
	[ -f "$OUT/$f" ] && printf '  %-15s %10s bytes  %s\n' "$f" "$(stat -c %s "$OUT/$f")" "$OUT/$f"
done
exit 0
