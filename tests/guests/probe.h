/* Shared declarations of the wisp probe guest (see README.md). */
#ifndef PROBE_H
#define PROBE_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* Must match boot.S. */
#define MAX_CPUS 64
#define KSTACK_SIZE 0x2000
#define USTACK_SIZE 0x4000

#define SEL_KCODE64 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x1b /* index 3, RPL 3 */
#define SEL_UCODE64 0x23 /* index 4, RPL 3 */
#define SEL_TSS0 0x30 /* 16-byte TSS descriptors from index 6 on */

/* RFLAGS for CPL3: IF (bit 9), IOPL 3 (bits 12-13) so IN/OUT work at CPL3
 * (Intel SDM Vol. 1, 18.2.1), bit 1 reserved as one. */
#define RFLAGS_USER 0x3202ull

/* Interrupt vectors the probe uses. */
#define VEC_LAPIC_TIMER 0x40
#define VEC_SERIAL 0x41
/* virtio-mmio devices: VEC_VIRTIO + slot, slot < VIRTIO_SLOTS (virtio.c). */
#define VEC_VIRTIO 0x42
#define VIRTIO_SLOTS 4
/* int $VEC_WAIT from CPL3 (DPL 3 gate): halt until an interrupt (main.c). */
#define VEC_WAIT 0x48
/* Spurious vector: low nibble 1111 works on every xAPIC (SDM Vol. 3A, 11.9);
 * also the IDT's last entry. */
#define VEC_SPURIOUS 0x4f

#define LAPIC_BASE 0xfee00000ull

/* PVH boot ABI: xen/include/public/arch-x86/hvm/start_info.h */
#define HVM_START_MAGIC 0x336ec578
struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr; /* version >= 1 */
	u32 memmap_entries;
	u32 reserved;
};

struct hvm_memmap_table_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

#define IOPB_PORTS 0x1000

/* Per-CPU state. Intel SDM Vol. 3A, 8.7: the 64-bit TSS. */
struct tss64 {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iopb_offset;
	/* I/O permission bitmap (SDM Vol. 1, 19.5.2): a clear bit allows the
	 * port at CPL3. Covers ports 0..IOPB_PORTS-1, then the 0xff end byte. */
	u8 iopb[IOPB_PORTS / 8 + 1];
	u8 pad[7]; /* whole qwords, for zeroing */
} __attribute__((packed));

/* Register frame pushed by isr_common in boot.S (lowest address first). */
struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error_code;
	u64 rip, cs, rflags, rsp, ss;
};

/* boot.S */
extern u8 ap_trampoline_start[], ap_trampoline_end[];
extern u8 isr_stubs[];
extern u64 gdt[];
extern u64 pml4[], pdpt[], pd[], pd_high[];
extern u8 kstacks[], ustacks[];
extern u8 _image_start[], _image_end[];
extern u32 start_info_paddr;
void enter_user(void (*fn)(u64), u64 arg, u64 rsp, u64 rflags) __attribute__((noreturn));

/* Port and memory-mapped I/O. */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
/*
 * Sleep until the next interrupt unless *p != v already: main.c checks with
 * interrupts off, then sti; hlt (the STI shadow keeps an interrupt from
 * slipping in between, SDM Vol. 2B, STI). The vCPU blocks in the VMM instead
 * of spinning, so the VMM's own threads get the host CPU.
 */
static inline void wait_change16(const volatile u16 *p, u16 v)
{
	__asm__ volatile("int $0x48" ::"D"(p), "S"((u64)v) : "memory");
}
static inline void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* lib.c */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
void printf(const char *fmt, ...);
extern int serial_unlocked;
void fail(const char *fmt, ...) __attribute__((noreturn));
void tsc_calibrate(void);
extern u64 tsc_hz;
void delay_us(u64 us);
u64 tsc_deadline(u64 ms);
int tsc_passed(u64 deadline);

/* Command line parameters "key=value" (lib.c). cmdline_u64 accepts decimal or 0x hex;
 * cmdline_str copies the value (at most n - 1 bytes) and returns 1 if the key is there. */
u64 cmdline_u64(const char *key, u64 def);
int cmdline_str(const char *key, char *out, u32 n);
u64 parse_u64(const char **p);

/* acpi.c */
struct acpi_info {
	u64 rsdp, xsdt, fadt, dsdt, madt;
	u32 ncpus; /* enabled Local APIC / x2APIC entries in the MADT */
	u32 apic_ids[MAX_CPUS];
	u64 ioapic_addr;
	u32 ioapic_gsi_base;
	u32 nioapics; /* every I/O APIC in the MADT (QEMU's microvm has two) */
	struct {
		u64 addr;
		u32 gsi_base;
	} ioapics[8];
	u32 irq4_gsi; /* ISA IRQ 4 after interrupt source overrides */
	u16 irq4_flags; /* MPS INTI flags of that override, 0 = bus default */
};
extern struct acpi_info acpi;
int acpi_init(u64 rsdp_paddr, int verbose);
void acpi_poweroff(void) __attribute__((noreturn));
void acpi_reset(void) __attribute__((noreturn));
void i8042_reset(void); /* returns if no reset happened within ~2 s */

/* main.c */
extern char scenario[32];
extern volatile u32 cpus_checked_in;
extern volatile u32 lapic_ticks, serial_irqs, bp_hits;
extern volatile u32 virtio_irqs[VIRTIO_SLOTS];
/* InterruptStatus bits the handler read and acknowledged, per slot; the
 * window each slot's handler acknowledges (virtio.c sets it). */
extern volatile u32 virtio_isr[VIRTIO_SLOTS];
extern u64 virtio_base[VIRTIO_SLOTS];
u64 ustack_top(u32 cpu);
/* CPUID as the VMM presents it, read at CPL0 (on PVM, CPUID at CPL3 is not
 * intercepted and returns the host CPU's values). */
extern u32 cpuid_apic_id[MAX_CPUS]; /* CPUID.1:EBX[31:24] per CPU index */
extern u32 cpuid_1_ecx; /* BSP */
extern int cpu_1g_pages; /* CPUID.80000001H:EDX.Page1GB[26] */
extern char cpuid_hv_signature[13]; /* CPUID.40000000H:EBX,ECX,EDX */
void trap(struct trap_frame *f);

/* scenarios.c */
extern char cmdline[1024];
void lapic_enable(void);
u32 lapic_id(void);
void ioapic_write(u32 reg, u32 v);
void done(void) __attribute__((noreturn));

/* virtio.c: a minimal virtio-mmio driver (virtio 1.2 §4.2.2) with split virtqueues (§2.7). */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_BALLOON 5
#define VIRTIO_ID_RNG 4
#define VIRTIO_MAGIC 0x74726976 /* "virt" */

/* virtio-mmio registers (virtio 1.2 §4.2.2). */
#define VMMIO_MAGIC 0x000
#define VMMIO_VERSION 0x004
#define VMMIO_DEVICE_ID 0x008
#define VMMIO_VENDOR_ID 0x00c
#define VMMIO_DEVICE_FEATURES 0x010
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DRIVER_FEATURES 0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL 0x030
#define VMMIO_QUEUE_NUM_MAX 0x034
#define VMMIO_QUEUE_NUM 0x038
#define VMMIO_QUEUE_READY 0x044
#define VMMIO_QUEUE_NOTIFY 0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK 0x064
#define VMMIO_STATUS 0x070
#define VMMIO_QUEUE_DESC_LOW 0x080
#define VMMIO_QUEUE_DESC_HIGH 0x084
#define VMMIO_QUEUE_DRIVER_LOW 0x090
#define VMMIO_QUEUE_DRIVER_HIGH 0x094
#define VMMIO_QUEUE_DEVICE_LOW 0x0a0
#define VMMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VMMIO_CONFIG_GENERATION 0x0fc
#define VMMIO_CONFIG 0x100

/* Device status bits (virtio 1.2 §2.1). */
#define VSTAT_ACKNOWLEDGE 1
#define VSTAT_DRIVER 2
#define VSTAT_DRIVER_OK 4
#define VSTAT_FEATURES_OK 8
#define VSTAT_NEEDS_RESET 0x40
#define VSTAT_FAILED 0x80

#define VIRTIO_F_VERSION_1 (1ull << 32)

/* Split virtqueue layout (virtio 1.2 §2.7.5, §2.7.6, §2.7.8). */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1
struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
struct vring_avail {
	u16 flags;
	u16 idx;
	u16 ring[];
};
struct vring_used_elem {
	u32 id;
	u32 len;
};
struct vring_used {
	u16 flags;
	u16 idx;
	struct vring_used_elem ring[];
};

struct virtio_dev {
	u64 base;
	u32 gsi;
	u32 device_id;
	u32 slot; /* interrupt vector VEC_VIRTIO + slot, counter virtio_irqs[slot] */
	int edge, active_low; /* from the ACPI interrupt descriptor */
	u64 features; /* offered by the device */
	u64 acked; /* accepted by the driver */
};

struct vq {
	struct virtio_dev *dev;
	u16 index, size;
	volatile struct vring_desc *desc;
	volatile struct vring_avail *avail;
	volatile struct vring_used *used;
	u16 avail_idx, last_used;
};

void *dma_alloc(u64 size);
u32 vio_read(const struct virtio_dev *d, u32 reg);
void vio_write(const struct virtio_dev *d, u32 reg, u32 v);
void virtio_find(u32 device_id, u32 nth, struct virtio_dev *d, const char *what);
void virtio_route_irq(struct virtio_dev *d);
u64 virtio_negotiate(struct virtio_dev *d, const char *what, u64 wanted, int print);
void virtio_queue_setup(struct virtio_dev *d, struct vq *q, u16 index, u16 size);
void virtio_driver_ok(struct virtio_dev *d, const char *what);
void vq_publish(struct vq *q, u16 head);
void vq_kick(struct vq *q);
int vq_wait_used(struct vq *q, u64 timeout_ms, u32 *id, u32 *len);
int vq_has_used(struct vq *q);
void vq_pop_used(struct vq *q, u32 *id, u32 *len);
u32 virtio_config32(const struct virtio_dev *d, u32 off);
void scenario_blk(void) __attribute__((noreturn));
void scenario_blk_net(void) __attribute__((noreturn));
void scenario_blk_hostile(void) __attribute__((noreturn));
void scenario_blk_flush_then_hang(void) __attribute__((noreturn));
void scenario_blk_write_then_end(void) __attribute__((noreturn));
void snap_blk_init(void);
void snap_blk_step(u64 n);
void wait_ctrl_alt_del(void);
void scenario_blk_bench(void) __attribute__((noreturn));

/* blk_media.c */
void scenario_blk_media(void) __attribute__((noreturn));

/* net.c */
void scenario_net(void) __attribute__((noreturn));

/* vsock.c */
void scenario_vsock(void) __attribute__((noreturn));

/* rng.c */
void scenario_rng(void) __attribute__((noreturn));
/* balloon.c */
void scenario_balloon(void) __attribute__((noreturn));

/* floods.c */
void scenario_i8042_flood(void) __attribute__((noreturn));
void scenario_console_flood(void) __attribute__((noreturn));
void scenario_log_flood(void) __attribute__((noreturn));
void kmain(u32 start_info_paddr);
void ap_kmain(u32 index);

/* The 16 XMM registers from / to 256 bytes at %0 (movdqu: no alignment needed):
 * __asm__ volatile(XMM_LOAD_ASM ::"r"(p) : "memory"). */
#define XMM_LOAD_ASM "movdqu 0x00(%0), %%xmm0\nmovdqu 0x10(%0), %%xmm1\nmovdqu 0x20(%0), %%xmm2\nmovdqu 0x30(%0), %%xmm3\nmovdqu 0x40(%0), %%xmm4\nmovdqu 0x50(%0), %%xmm5\nmovdqu 0x60(%0), %%xmm6\nmovdqu 0x70(%0), %%xmm7\nmovdqu 0x80(%0), %%xmm8\nmovdqu 0x90(%0), %%xmm9\nmovdqu 0xa0(%0), %%xmm10\nmovdqu 0xb0(%0), %%xmm11\nmovdqu 0xc0(%0), %%xmm12\nmovdqu 0xd0(%0), %%xmm13\nmovdqu 0xe0(%0), %%xmm14\nmovdqu 0xf0(%0), %%xmm15"
#define XMM_STORE_ASM "movdqu %%xmm0, 0x00(%0)\nmovdqu %%xmm1, 0x10(%0)\nmovdqu %%xmm2, 0x20(%0)\nmovdqu %%xmm3, 0x30(%0)\nmovdqu %%xmm4, 0x40(%0)\nmovdqu %%xmm5, 0x50(%0)\nmovdqu %%xmm6, 0x60(%0)\nmovdqu %%xmm7, 0x70(%0)\nmovdqu %%xmm8, 0x80(%0)\nmovdqu %%xmm9, 0x90(%0)\nmovdqu %%xmm10, 0xa0(%0)\nmovdqu %%xmm11, 0xb0(%0)\nmovdqu %%xmm12, 0xc0(%0)\nmovdqu %%xmm13, 0xd0(%0)\nmovdqu %%xmm14, 0xe0(%0)\nmovdqu %%xmm15, 0xf0(%0)"

#endif
