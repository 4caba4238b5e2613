/*
 * wisp probe guest: PVH entry, long mode, AP trampoline, interrupt stubs,
 * and the drop to CPL3. Everything here runs at CPL0, which PVM interprets
 * (about a million instructions a second), so it is kept short.
 */

#define MAX_CPUS 64
#define KSTACK_SIZE 0x2000
#define USTACK_SIZE 0x4000

#define SEL_KCODE64 0x08
#define SEL_KDATA 0x10
#define SEL_KCODE32 0x28

/* Page table entry bits (Intel SDM Vol. 3A, 4.5): P, R/W, U/S, PS. */
#define PTE_TABLE 0x7
#define PTE_LARGE 0x87

/*
 * PVH boot ABI (xen/include/public/elfnote.h): XEN_ELFNOTE_PHYS32_ENTRY = 18
 * gives the 32-bit physical entry point. Written as a quad like Linux does;
 * loaders read the low 32 bits (QEMU reads a full word on 64-bit ELFs).
 */
	.section .note.pvh, "a"
	.balign 4
	.long 4			/* namesz: "Xen\0" */
	.long 8			/* descsz */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad pvh_start
	.balign 4

	.section .data
	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00af9b000000ffff	/* 0x08 kernel code, 64-bit */
	.quad 0x00cf93000000ffff	/* 0x10 kernel data */
	.quad 0x00cff3000000ffff	/* 0x18 user data, DPL 3 */
	.quad 0x00affb000000ffff	/* 0x20 user code, 64-bit, DPL 3 */
	.quad 0x00cf9b000000ffff	/* 0x28 kernel code, 32-bit (entry, APs) */
	.fill MAX_CPUS * 2, 8, 0	/* 0x30.. one 16-byte TSS descriptor per CPU */
gdt_end:
gdtr:
	.word gdt_end - gdt - 1
	.quad gdt

	.globl start_info_paddr
start_info_paddr:
	.long 0
	/* Next AP index; the BSP is CPU 0. */
ap_next_index:
	.long 1

/*
 * Intel SDM Vol. 3A, 10.8.5: CR4.PAE, CR3, EFER.LME, then CR0.PG. No stack.
 * CR4 is set outright (PAE only): SMEP/SMAP left on by a VMM would fault this
 * code, which runs from user-accessible pages.
 */
.macro ENABLE_LONG_MODE
	mov $(1 << 5), %eax
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $0xc0000080, %ecx
	rdmsr
	or $(1 << 8), %eax
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax
	mov %eax, %cr0
.endm

/*
 * PVH entry: 32-bit protected mode, paging off, EBX = start_info physical
 * address. Segment selectors are undefined, so load our own GDT first.
 */
	.section .text.boot, "ax"
	.code32
	.globl pvh_start
pvh_start:
	cli
	cld
	lgdt gdtr
	ljmp $SEL_KCODE32, $1f
1:	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	mov %ebx, start_info_paddr

	/* Zero .bss: only small variables live there (see probe.ld). */
	mov $__bss_start, %edi
	mov $__bss_end, %ecx
	sub %edi, %ecx
	shr $2, %ecx
	xor %eax, %eax
	rep stosl

	ENABLE_LONG_MODE
	ljmp $SEL_KCODE64, $bsp_long

	.code64
bsp_long:
	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	xor %eax, %eax
	mov %eax, %fs
	mov %eax, %gs
	mov $(kstacks + KSTACK_SIZE), %rsp
	mov start_info_paddr(%rip), %edi
	call kmain
6:	hlt
	jmp 6b

/*
 * AP startup (Intel SDM Vol. 3A, 9.4.4 MP initialization): a STARTUP IPI
 * starts the AP in real mode at CS = vector << 8, IP = 0. smp code copies this
 * page-relative blob below 1 MiB. It loads the GDT (the pseudo-descriptor sits
 * inside the blob, addressed relative to CS) and jumps to 32-bit code in the
 * image at its link address.
 */
	.code16
	.globl ap_trampoline_start
ap_trampoline_start:
	cli
	cld
	mov %cs, %ax
	mov %ax, %ds
	lgdtl ap_gdtr - ap_trampoline_start
	mov %cr0, %eax
	or $1, %eax
	mov %eax, %cr0
	ljmpl $SEL_KCODE32, $ap_entry32
	.balign 8
ap_gdtr:
	.word gdt_end - gdt - 1
	.long gdt
	.globl ap_trampoline_end
ap_trampoline_end:

	.code32
ap_entry32:
	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	ENABLE_LONG_MODE
	ljmp $SEL_KCODE64, $ap_long

	.code64
ap_long:
	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	xor %eax, %eax
	mov %eax, %fs
	mov %eax, %gs
	mov $1, %eax
	lock xadd %eax, ap_next_index(%rip)
	cmp $MAX_CPUS, %eax
	jae 9f
	mov %eax, %edi
	lea 1(%rax), %rcx
	shl $13, %rcx			/* KSTACK_SIZE */
	add $kstacks, %rcx
	mov %rcx, %rsp
	call ap_kmain
9:	cli
	hlt
	jmp 9b

/*
 * Interrupt and exception stubs, 16 bytes each: isr_stubs + 16 * vector, for
 * vectors 0 to 0x4f (VEC_SPURIOUS, the IDT's last entry).
 * Vectors that push an error code (Intel SDM Vol. 3A, 7.15 / table 7-1):
 * 8, 10-14, 17, 21, 29, 30. The others push a zero to keep one frame layout.
 */
	.text
	.balign 16
	.globl isr_stubs
isr_stubs:
	.set vec, 0
	.rept 0x50
	.balign 16
	.if (vec == 8) || (vec >= 10 && vec <= 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	.set vec, vec + 1
	.endr

isr_common:
	push %rax
	push %rbx
	push %rcx
	push %rdx
	push %rsi
	push %rdi
	push %rbp
	push %r8
	push %r9
	push %r10
	push %r11
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rsp, %rdi
	cld
	call trap
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %r11
	pop %r10
	pop %r9
	pop %r8
	pop %rbp
	pop %rdi
	pop %rsi
	pop %rdx
	pop %rcx
	pop %rbx
	pop %rax
	add $16, %rsp
	iretq

/*
 * enter_user(fn, arg, rsp, rflags): IRETQ to fn(arg) at CPL3 (Intel SDM
 * Vol. 2A, IRET: return to outer privilege level). fn must not return; if it
 * does it lands in user_returned.
 */
	.globl enter_user
enter_user:
	sub $8, %rdx
	movq $user_returned, (%rdx)
	pushq $0x1b			/* SS: user data, RPL 3 */
	pushq %rdx			/* RSP */
	pushq %rcx			/* RFLAGS */
	pushq $0x23			/* CS: user code, RPL 3 */
	pushq %rdi			/* RIP */
	mov %rsi, %rdi
	xor %eax, %eax
	mov %eax, %ds
	mov %eax, %es
	iretq

/*
 * Identity map of the first 4 GiB with 2 MiB pages, every level user-accessible
 * (U/S = 1) so CPL3 code reaches RAM, the LAPIC, the IOAPIC and the ACPI
 * tables directly (Intel SDM Vol. 3A, 4.5). Built by the assembler and loaded
 * with the image, so the interpreted CPL0 boot path does no work for it;
 * main.c maps RAM above 4 GiB for the info scenario.
 */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl pml4, pdpt, pd
pml4:
	.quad pdpt + PTE_TABLE
	.fill 511, 8, 0
pdpt:
	.quad pd + PTE_TABLE, pd + 0x1000 + PTE_TABLE, pd + 0x2000 + PTE_TABLE, pd + 0x3000 + PTE_TABLE
	.fill 508, 8, 0
pd:
	.set i, 0
	.rept 2048
	.quad (i << 21) | PTE_LARGE
	.set i, i + 1
	.endr

/* Not zeroed at boot (see probe.ld): every byte used is written first. */
	.section .nozero, "aw", @nobits
	.balign 4096
	.globl pd_high, kstacks, ustacks
pd_high:
	.fill 60 * 4096, 1, 0		/* 2 MiB pages for 4-64 GiB (main.c) */
kstacks:
	.fill MAX_CPUS * KSTACK_SIZE, 1, 0
ustacks:
	.fill MAX_CPUS * USTACK_SIZE, 1, 0
