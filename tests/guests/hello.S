/*
 * hello.elf: the smallest useful PVH guest, for boot benchmarks. Prints
 * "probe: hello" on COM1 and powers off through the FADT sleep control
 * register, all in 32-bit protected mode with paging off (as PVH enters):
 * no long mode, no CPL3, a few hundred interpreted instructions.
 * Falls back to an i8042 reset if it finds no ACPI sleep register.
 */
	.section .note.pvh, "a"
	.balign 4
	.long 4, 8, 18			/* "Xen", 8 bytes, XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad hello_start
	.balign 4

	.text
	.code32
	.globl hello_start
hello_start:
	/* Flat 4 GiB CS/DS from the PVH ABI are all we need; no stack use. */
	mov $msg, %esi
1:	mov $0x3fd, %dx			/* LSR: wait (bounded) for THR empty */
	mov $10000, %ecx
2:	in %dx, %al
	test $0x20, %al
	loopz 2b
	mov $0x3f8, %dx
	lodsb
	out %al, %dx
	cmp $'\n', %al
	jne 1b
#ifdef IDLE
	jmp 7f				/* idle.elf: halt for good once the line is out */
#endif

	/* start_info.rsdp_paddr (offset 32) -> RSDP; ACPI 6.5, 5.2.5.3:
	 * revision >= 2 has the XSDT (8-byte entries) at +24, else RSDT at +16. */
	mov 32(%ebx), %esi
	test %esi, %esi
	jz reset
	mov 24(%esi), %edi
	mov $8, %ebp
	cmpb $2, 15(%esi)
	jb 3f
	test %edi, %edi
	jnz 4f
3:	mov 16(%esi), %edi
	mov $4, %ebp
4:	test %edi, %edi
	jz reset
	mov 4(%edi), %ecx		/* table length */
	lea (%edi, %ecx), %edx		/* end of entries */
	add $36, %edi
5:	cmp %edx, %edi
	jae reset
	mov (%edi), %eax
	add %ebp, %edi
	cmpl $0x50434146, (%eax)	/* "FACP" */
	jne 5b

	/* FADT SLEEP_CONTROL_REG (GAS at +244, address at +248), ACPI 6.5
	 * 4.8.3.7: SLP_TYP = 5 (bits 2-4) | SLP_EN (bit 5) = 0x34. */
	cmpl $256, 4(%eax)
	jb reset
	mov 248(%eax), %edx
	test %edx, %edx
	jz reset
	cmpb $1, 244(%eax)		/* system I/O */
	jne 6f
	mov $0x34, %al
	out %al, %dx
	jmp reset
6:	cmpb $0, 244(%eax)		/* system memory */
	jne reset
	movb $0x34, (%edx)

reset:
	mov $0xfe, %al			/* i8042: pulse the reset line */
	out %al, $0x64
7:	cli
	hlt
	jmp 7b

msg:
	.ascii "probe: hello\n"
