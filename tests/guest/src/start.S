# The CPL0 part of the test guest (AT&T syntax, included by start.rs).
#
# Everything here runs at CPL0, which a PVM host emulates instruction by
# instruction (about 1-2 million instructions/s): it is straight-line code of
# a few hundred instructions. The page tables and the IDT are built by the
# assembler (.rept) in .data, never by a loop at run time.
#
# PVH entry (pvh_start32): 32-bit protected mode, paging off, flat CS/DS/ES/SS,
# EBX = guest-physical address of hvm_start_info, no usable stack.
# Exit (iretq): CPL3, 64-bit, IF=1, RDI = that address, RSP = user stack,
# RIP = guest_main (Rust). Port I/O at CPL3 is allowed by the TSS I/O bitmap:
# IOPL=3 set through iretq does not survive on PVM.
#
# Template text for global_asm!: no braces anywhere in this file.

	.set KERNEL_CS, 0x08
	.set KERNEL_DS, 0x10
	.set USER_CS, 0x18 | 3
	.set USER_DS, 0x20 | 3
	.set TSS_SEL, 0x28

	.set CR0_PE, 1 << 0
	.set CR0_MP, 1 << 1
	.set CR0_ET, 1 << 4
	.set CR0_NE, 1 << 5
	.set CR0_WP, 1 << 16
	.set CR0_PG, 1 << 31
	.set CR4_PAE, 1 << 5
	.set CR4_OSFXSR, 1 << 9
	.set CR4_OSXMMEXCPT, 1 << 10
	.set MSR_EFER, 0xc0000080
	.set EFER_LME, 1 << 8
	.set RFLAGS_IF, 1 << 9
	.set RFLAGS_RESERVED, 1 << 1

	.set PTE_P, 1 << 0
	.set PTE_RW, 1 << 1
	.set PTE_US, 1 << 2
	.set PTE_PWT, 1 << 3
	.set PTE_PCD, 1 << 4
	.set PTE_PS, 1 << 7
	.set PTE_TABLE, PTE_P | PTE_RW | PTE_US
	.set PAGE_BYTES, 0x1000
	.set LARGE_PAGE_SHIFT, 21
	.set MMIO_HOLE_LARGE_PAGE, 0xc0000000 >> 21
	.set LAPIC_BASE, 0xfee00000
	.set LAPIC_LARGE_PAGE, 0xfee00000 >> 21
	.set LAPIC_ID, 0x20
	.set LAPIC_TPR, 0x80
	.set LAPIC_EOI, 0xb0
	.set LAPIC_SVR, 0xf0
	.set SPURIOUS_VECTOR, 0xff
	.set LAPIC_SVR_VALUE, 0x100 | SPURIOUS_VECTOR

	.set PIC1_CMD, 0x20
	.set PIC1_DATA, 0x21
	.set PIC2_CMD, 0xa0
	.set PIC2_DATA, 0xa1
	.set COM1_DATA, 0x3f8
	.set COM1_LSR, 0x3fd
	.set LSR_THRE, 0x20
	.set UART_POLL_LIMIT, 0x10000
	.set DEBUG_EXIT_PORT, 0xf4
	.set EXIT_EXCEPTION, 124

	# 64-bit TSS: RSP0 at +4, I/O map base at +0x66; the bitmap covers all
	# 65536 ports (one bit each, zero = allowed) and ends with an 0xff byte.
	.set TSS_RSP0, 4
	.set TSS_IOMAP_BASE, 0x66
	.set TSS_HEADER_BYTES, 0x68
	.set TSS_IOMAP_BYTES, 0x2000
	.set TSS_LIMIT, TSS_HEADER_BYTES + TSS_IOMAP_BYTES

	# The vector stubs sit at VECTORS_BASE, one per vector, VECTOR_STUB_BYTES
	# apart (link.ld places .text.cpl0_vectors first at 0x100000 and asserts
	# it), so every IDT gate is an assembler constant.
	.set VECTORS_BASE, 0x100000
	.set VECTOR_STUB_BYTES, 16
	.set IDT_GATE_INTR_DPL0, 0x8e00

	.set KERNEL_STACK_BYTES, 0x4000
	.set USER_STACK_BYTES, 0x10000

# ---------------------------------------------------------------- PVH note
	.pushsection .note.Xen, "a", @note
	.balign 4
	.long 4				# namesz ("Xen\0")
	.long 4				# descsz
	.long 18			# XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.balign 4
	.long pvh_start32
	.balign 4
	.popsection

# ---------------------------------------------------------------- vector stubs
	.pushsection .text.cpl0_vectors, "ax", @progbits
	.code64
	.globl cpl0_vectors
cpl0_vectors:
	# 0-31: exceptions. Push a zero error code where the CPU pushes none,
	# then the vector, so exc_common sees the same frame for all of them.
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.org \v * VECTOR_STUB_BYTES, 0xcc
	.if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
	.else
	pushq	$0
	.endif
	pushq	$\v
	jmp	exc_common
	.endr
	# 32-254: interrupts (the PICs are remapped to 32-47 and masked).
	.set vec, 32
	.rept SPURIOUS_VECTOR - 32
	.org vec * VECTOR_STUB_BYTES, 0xcc
	pushq	%rax
	movl	$vec, %eax
	jmp	irq_common
	.set vec, vec + 1
	.endr
	# 255: the LAPIC spurious vector, which must not be acknowledged.
	.org SPURIOUS_VECTOR * VECTOR_STUB_BYTES, 0xcc
	iretq
	.org 256 * VECTOR_STUB_BYTES, 0xcc

# Interrupt: count it per vector (IRQ_COUNTS in start.rs), EOI, return.
irq_common:
	incq	IRQ_COUNTS(, %rax, 8)
	movl	$LAPIC_BASE, %eax
	movl	$0, LAPIC_EOI(%rax)
	popq	%rax
	iretq

# Exception at any CPL: report on COM1, exit through the debug-exit port.
# Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.
exc_common:
	leaq	msg_exception(%rip), %rsi
	call	put_str
	movq	0(%rsp), %rax
	call	put_hex
	leaq	msg_error(%rip), %rsi
	call	put_str
	movq	8(%rsp), %rax
	call	put_hex
	leaq	msg_rip(%rip), %rsi
	call	put_str
	movq	16(%rsp), %rax
	call	put_hex
	leaq	msg_cr2(%rip), %rsi
	call	put_str
	movq	%cr2, %rax
	call	put_hex
	movl	$10, %eax			# newline
	call	put_char
	movb	$EXIT_EXCEPTION, %al
	outb	%al, $DEBUG_EXIT_PORT
1:	cli
	hlt
	jmp	1b

# put_char: AL to COM1 once the transmitter holds no byte (bounded wait, so a
# missing UART cannot hang the report). Clobbers RAX, RCX, RDX, R8.
put_char:
	movl	%eax, %r8d
	movl	$UART_POLL_LIMIT, %ecx
	movw	$COM1_LSR, %dx
1:	inb	%dx, %al
	testb	$LSR_THRE, %al
	jnz	2f
	decl	%ecx
	jnz	1b
2:	movl	%r8d, %eax
	movw	$COM1_DATA, %dx
	outb	%al, %dx
	ret

# put_str: the NUL-terminated string at RSI. Clobbers put_char's and RSI.
put_str:
	movzbl	(%rsi), %eax
	testb	%al, %al
	jz	1f
	call	put_char
	incq	%rsi
	jmp	put_str
1:	ret

# put_hex: RAX as 0x<hex digits>, no leading zeros. Clobbers put_char's, R9, R10.
put_hex:
	movq	%rax, %r9
	movl	$'0', %eax
	call	put_char
	movl	$'x', %eax
	call	put_char
	movl	$60, %r10d
1:	testl	%r10d, %r10d			# skip leading zero digits, keep the last
	jz	2f
	movq	%r9, %rax
	movl	%r10d, %ecx
	shrq	%cl, %rax
	testb	$0xf, %al
	jnz	2f
	subl	$4, %r10d
	jmp	1b
2:	movq	%r9, %rax
	movl	%r10d, %ecx
	shrq	%cl, %rax
	andl	$0xf, %eax
	leaq	hex_digits(%rip), %rdx
	movzbl	(%rdx, %rax), %eax
	call	put_char
	subl	$4, %r10d
	jns	2b
	ret
	.popsection

# ---------------------------------------------------------------- entry
	.pushsection .text.start32, "ax", @progbits
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	cld
	movl	%ebx, start_info_paddr		# upper half stays zero (.data)
	lgdt	gdt_ptr				# 32-bit lgdt reads limit + low 4 base bytes
	movl	$(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
	movl	%eax, %cr4
	movl	$(pdpt + PTE_TABLE), pml4
	movl	$(pd + 0 * PAGE_BYTES + PTE_TABLE), pdpt + 0 * 8
	movl	$(pd + 1 * PAGE_BYTES + PTE_TABLE), pdpt + 1 * 8
	movl	$(pd + 2 * PAGE_BYTES + PTE_TABLE), pdpt + 2 * 8
	movl	$(pd + 3 * PAGE_BYTES + PTE_TABLE), pdpt + 3 * 8
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	# EM and TS clear: the precompiled core uses SSE. CD/NW clear: caches on.
	movl	$(CR0_PG | CR0_WP | CR0_NE | CR0_ET | CR0_MP | CR0_PE), %eax
	movl	%eax, %cr0
	ljmpl	$KERNEL_CS, $start64

	.code64
start64:
	movl	$KERNEL_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	xorl	%eax, %eax
	movl	%eax, %fs
	movl	%eax, %gs
	leaq	kernel_stack_top(%rip), %rsp

	# The page below the user stack: not present (overflows fault).
	leaq	user_stack_guard(%rip), %rax
	shrq	$12, %rax
	leaq	pt_low(%rip), %rcx
	movq	$0, (%rcx, %rax, 8)
	invlpg	user_stack_guard(%rip)

	# TSS: base into its GDT descriptor, RSP0, I/O bitmap (zero in .bss =
	# every port allowed) and its terminating 0xff byte.
	leaq	tss(%rip), %rax
	movw	%ax, gdt_tss + 2(%rip)
	shrq	$16, %rax
	movb	%al, gdt_tss + 4(%rip)
	movb	%ah, gdt_tss + 7(%rip)
	leaq	kernel_stack_top(%rip), %rax
	movq	%rax, tss + TSS_RSP0(%rip)
	movw	$TSS_HEADER_BYTES, tss + TSS_IOMAP_BASE(%rip)
	movb	$0xff, tss + TSS_LIMIT(%rip)
	movw	$TSS_SEL, %ax
	ltr	%ax
	lidt	idt_ptr(%rip)

	# 8259 PICs: remap to vectors 32-47 (away from the exceptions), mask all.
	movb	$0x11, %al			# ICW1: init, ICW4 follows
	outb	%al, $PIC1_CMD
	outb	%al, $PIC2_CMD
	movb	$0x20, %al			# ICW2: vector bases
	outb	%al, $PIC1_DATA
	movb	$0x28, %al
	outb	%al, $PIC2_DATA
	movb	$0x04, %al			# ICW3: slave on IRQ2
	outb	%al, $PIC1_DATA
	movb	$0x02, %al
	outb	%al, $PIC2_DATA
	movb	$0x01, %al			# ICW4: 8086 mode
	outb	%al, $PIC1_DATA
	outb	%al, $PIC2_DATA
	movb	$0xff, %al			# OCW1: mask every line
	outb	%al, $PIC1_DATA
	outb	%al, $PIC2_DATA

	# LAPIC: accept every priority, software-enable with the spurious vector.
	movl	$LAPIC_BASE, %eax
	movl	$0, LAPIC_TPR(%rax)
	movl	$LAPIC_SVR_VALUE, LAPIC_SVR(%rax)
	# Its ID (xAPIC: bits 31:24), for MSI destinations: CPL3 cannot read the
	# LAPIC page, and CPUID's initial APIC ID is not reliable on PVM.
	movl	LAPIC_ID(%rax), %ecx
	shrl	$24, %ecx
	movl	%ecx, boot_lapic_id(%rip)

	# The TSC rate from the hypervisor timing leaf 0x40000010 (kHz), read
	# here at CPL0: CPUID at CPL3 is not always intercepted (PVM) and then
	# reports the host's leaves, not the ones the VMM set.
	movl	$0x40000000, %eax
	cpuid
	cmpl	$0x40000010, %eax
	jb	2f
	movl	$0x40000010, %eax
	cpuid
	movl	%eax, boot_tsc_khz(%rip)
2:

	# To CPL3: guest_main(start_info_paddr), RSP + 8 16-byte aligned as
	# after a call.
	movq	start_info_paddr(%rip), %rdi
	pushq	$USER_DS
	leaq	user_stack_top - 8(%rip), %rax
	pushq	%rax
	pushq	$(RFLAGS_IF | RFLAGS_RESERVED)
	pushq	$USER_CS
	leaq	guest_main(%rip), %rax
	pushq	%rax
	xorl	%eax, %eax
	xorl	%ecx, %ecx
	xorl	%edx, %edx
	iretq
	.popsection

# ---------------------------------------------------------------- read-only
	.pushsection .rodata.cpl0, "a", @progbits
msg_exception:
	.asciz "testguest: exception vector="
msg_error:
	.asciz " error="
msg_rip:
	.asciz " rip="
msg_cr2:
	.asciz " cr2="
hex_digits:
	.ascii "0123456789abcdef"
	.popsection

# ---------------------------------------------------------------- page tables
# Identity map of the first 4 GiB, every page user-accessible except the LAPIC;
# 0xc0000000-0xffffffff (MMIO hole) uncached. The first 2 MiB use 4 KiB pages
# so that the user stack guard page can be left out. Page 0 stays mapped: QEMU's
# PVH option ROM puts the memory map there (0x5a8).
# PML4 and PDPT hold one and four entries: they live in .bss and pvh_start32
# fills them, rather than taking 8 KiB of zeros in the file.
	.pushsection .data.cpl0_pagetables, "aw", @progbits
	.balign PAGE_BYTES
pd:
	.quad	pt_low + PTE_TABLE
	.set page, 1
	.rept 2047
	.if page == LAPIC_LARGE_PAGE
	.quad	(page << LARGE_PAGE_SHIFT) | PTE_P | PTE_RW | PTE_PS | PTE_PWT | PTE_PCD
	.elseif page >= MMIO_HOLE_LARGE_PAGE
	.quad	(page << LARGE_PAGE_SHIFT) | PTE_P | PTE_RW | PTE_US | PTE_PS | PTE_PWT | PTE_PCD
	.else
	.quad	(page << LARGE_PAGE_SHIFT) | PTE_P | PTE_RW | PTE_US | PTE_PS
	.endif
	.set page, page + 1
	.endr
pt_low:
	.set page, 0
	.rept 512
	.quad	(page << 12) | PTE_P | PTE_RW | PTE_US
	.set page, page + 1
	.endr
	.popsection

# ---------------------------------------------------------------- descriptors
	.pushsection .data.cpl0, "aw", @progbits
	.balign 16
gdt:
	.quad	0
	.quad	0x00af9b000000ffff		# 0x08 CPL0 code, 64-bit
	.quad	0x00cf93000000ffff		# 0x10 CPL0 data
	.quad	0x00affb000000ffff		# 0x18 CPL3 code, 64-bit
	.quad	0x00cff3000000ffff		# 0x20 CPL3 data
gdt_tss:
	.quad	0x0000890000000000 | TSS_LIMIT	# 0x28 64-bit TSS (base set at boot)
	.quad	0
gdt_end:
	.balign 8
	.word	0, 0, 0
gdt_ptr:
	.word	gdt_end - gdt - 1
	.quad	gdt
	.word	0, 0, 0
idt_ptr:
	.word	256 * 16 - 1
	.quad	idt

	.balign 8
	.globl start_info_paddr
start_info_paddr:
	.quad	0
	.globl boot_lapic_id
boot_lapic_id:
	.long	0
	.globl boot_tsc_khz
boot_tsc_khz:
	.long	0

	.balign 16
idt:
	.set vec, 0
	.rept 256
	.word	(VECTORS_BASE + vec * VECTOR_STUB_BYTES) & 0xffff
	.word	KERNEL_CS
	.word	IDT_GATE_INTR_DPL0
	.word	((VECTORS_BASE + vec * VECTOR_STUB_BYTES) >> 16) & 0xffff
	.long	0				# offset 63:32
	.long	0
	.set vec, vec + 1
	.endr
	.popsection

# ---------------------------------------------------------------- zeroed
# The loaders (QEMU, linux-loader into fresh guest RAM) zero the bss.
	.pushsection .bss.cpl0, "aw", @nobits
	.balign PAGE_BYTES
pml4:
	.skip	PAGE_BYTES
pdpt:
	.skip	PAGE_BYTES
	.globl user_stack_guard
user_stack_guard:
	.skip	PAGE_BYTES
user_stack:
	.skip	USER_STACK_BYTES
user_stack_top:
kernel_stack:
	.skip	KERNEL_STACK_BYTES
kernel_stack_top:
	.balign 16
tss:
	.skip	TSS_LIMIT + 1
	.popsection
