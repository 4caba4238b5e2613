# shellcheck shell=bash
# The test kernel part of images/build.sh (sourced by it). The content of this
# file is part of the kernel cache key: changing it rebuilds the kernel.
#
# Uses from build.sh: HERE OUT BUILD CACHE KSRC_TAR JOBS log die src_version
# has_pvh_note.

KERNEL_FRAGMENT="$HERE/kernel/wisp.config"
KERNEL_PATCH="$HERE/kernel/pvm-syscall.patch"

# Cache key: Debian source package version, config fragment, patch, this file.
kernel_hash() {
	{
		echo "linux-source-6.1 $(src_version)"
		sha256sum <"$KERNEL_FRAGMENT"
		sha256sum <"$KERNEL_PATCH"
		sha256sum <"$HERE/kernel/kernel.sh"
	} | sha256sum | cut -c1-16
}

# Every CONFIG_X=v line of the fragment must be in the final .config verbatim,
# and every "# CONFIG_X is not set" line must not be enabled there:
# `make olddefconfig`/merge_config silently drop options whose dependencies
# are missing. NR_CPUS is checked for a lower bound.
kernel_check_config() {
	local config=$1 bad=0 line opt
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*)
			if ! grep -qxF "$line" "$config"; then
				log "kernel config: wanted '$line', have '$(grep -E "^(# )?${line%%=*}[= ]" "$config" || echo absent)'"
				bad=1
			fi
			;;
		"# CONFIG_"*" is not set")
			opt=${line#\# }
			opt=${opt%% *}
			if grep -qE "^$opt=[ym]" "$config"; then
				log "kernel config: wanted $opt off, have '$(grep -E "^$opt=" "$config")'"
				bad=1
			fi
			;;
		esac
	done <"$KERNEL_FRAGMENT"
	local ncpus
	ncpus=$(sed -n 's/^CONFIG_NR_CPUS=//p' "$config")
	if [ -z "$ncpus" ] || [ "$ncpus" -lt 32 ]; then
		log "kernel config: CONFIG_NR_CPUS='$ncpus', want >= 32"
		bad=1
	fi
	[ "$bad" -eq 0 ] || die "the kernel .config lacks required options (see above)"
	log "kernel config: all options of $(basename "$KERNEL_FRAGMENT") present"
}

build_kernel() {
	local hash cached tree start
	hash=$(kernel_hash)
	cached="$CACHE/kernel-$hash"
	if [ -f "$cached/vmlinux" ] && [ -f "$cached/bzImage" ]; then
		log "kernel: cache hit $cached"
	else
		log "kernel: cache miss ($cached), building"
		start=$(date +%s)
		tree="$BUILD/linux-$hash"
		# The tree is reused (incremental make) only if it was fully
		# unpacked and patched for this very key.
		if [ ! -f "$tree/.wisp-prepared" ]; then
			rm -rf "$BUILD"/linux-*
			mkdir -p "$tree"
			log "kernel: unpacking $KSRC_TAR"
			tar -xaf "$KSRC_TAR" -C "$tree" --strip-components=1
			patch -d "$tree" -p1 --forward <"$KERNEL_PATCH"
			touch "$tree/.wisp-prepared"
		fi
		make -C "$tree" -s ARCH=x86_64 tinyconfig
		# allnoconfig mode: options named nowhere stay off (no default-y creep).
		(cd "$tree" && ARCH=x86_64 scripts/kconfig/merge_config.sh -n .config "$KERNEL_FRAGMENT" >"$BUILD/merge_config.log" 2>&1) ||
			die "kernel: merge_config.sh failed, see $BUILD/merge_config.log"
		kernel_check_config "$tree/.config"
		log "kernel: make -j$JOBS bzImage (about 10 minutes on 2 cores)"
		make -C "$tree" -j"$JOBS" ARCH=x86_64 bzImage
		kernel_check_config "$tree/.config"
		has_pvh_note "$tree/vmlinux" ||
			die "kernel: $tree/vmlinux has no PVH (XEN_ELFNOTE_PHYS32_ENTRY) note"
		rm -rf "$cached.tmp"
		mkdir -p "$cached.tmp"
		cp "$tree/vmlinux" "$cached.tmp/vmlinux"
		cp "$tree/arch/x86/boot/bzImage" "$cached.tmp/bzImage"
		cp "$tree/.config" "$cached.tmp/config"
		rm -rf "$cached"
		mv "$cached.tmp" "$cached"
		log "kernel: built in $(($(date +%s) - start)) s, cached in $cached"
	fi
	cp "$cached/vmlinux" "$OUT/vmlinux"
	cp "$cached/bzImage" "$OUT/bzImage"
	cp "$cached/config" "$OUT/kernel.config"
}
