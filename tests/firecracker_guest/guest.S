/*
 * A bare-metal guest for Firecracker, built and run by tests/test_real_firecracker.py.
 *
 * How Firecracker 1.12 starts it (src/vmm/src/arch/x86_64/{mod,regs,layout}.rs):
 * linux-loader loads the ELF's PT_LOAD segments at their physical addresses (each
 * at or above 1 MiB) and, without a PVH note, Firecracker enters e_entry per the
 * Linux 64-bit boot protocol: long mode, paging on with the first 1 GiB mapped
 * 1:1 by 2 MiB pages, flat segments, rsp = 0x8ff0, rsi = the boot_params ("zero
 * page", with the e820 table) at 0x7000, interrupts off.
 *
 * On the nested /dev/kvm of CI (kvm_pvm) each instruction of this guest costs
 * about a microsecond (as if KVM emulated them all), but an iteration of a string
 * instruction only tens of nanoseconds: so memory is filled with `rep movsq` and
 * checked with `repe cmpsq`, with a few instructions per 4 KiB page around them
 * (16 MiB: about a second each way).
 *
 * What it does:
 *   1. finds the end of RAM (the highest end of a usable e820 range, capped at the
 *      1 GiB mapped);
 *   2. writes a reference page at REF: word i = mix(REF + 8 i), where
 *      mix(a) = (a * GOLDEN) ^ ((a * GOLDEN) >> 29), modulo 2**64;
 *   3. fills every page P of [FILL_START, end) with the reference page, then puts
 *      P itself in its first word, so that every page differs from the others;
 *   4. forever: prints "begin N", reads every page back (its first word, then
 *      words 1 to 511 with `repe cmpsq` against REF), folds into a 64-bit FNV-1a
 *      digest each page's first word, where the comparison stopped and the last
 *      word it read, and prints "hash N <digest> <pages>" (all in hex); then waits
 *      for a byte on COM1's receiver (Firecracker's stdin, a pipe) and reads it.
 *
 * The host pauses and snapshots it while it waits. A restored copy goes on waiting
 * until the host writes a byte, so its next "begin" comes after the restore and
 * that iteration reads all the memory the guest filled through the page-fault
 * handler. The digest depends on every byte of the filled pages and of REF; the
 * host computes the expected one for intact memory. After the fill the guest
 * writes nothing but its stack.
 */

#define COM1            0x3f8       /* data (THR/RBR) */
#define COM1_LSR        0x3fd       /* line status; bit 0: a byte was received */
#define E820_ENTRIES    0x1e8       /* u8 in struct boot_params */
#define E820_TABLE      0x2d0       /* struct boot_e820_entry[]: u64 addr, u64 size, u32 type */
#define E820_ENTRY_SIZE 20
#define E820_RAM        1
#define REF             0x1ff000    /* the reference page, just below FILL_START */
#define FILL_START      0x200000    /* 2 MiB: above this image and Firecracker's boot data */
#define MAPPED_END      0x40000000  /* 1 GiB: what Firecracker's boot page tables map */
#define PAGE            4096
#define WORDS           (PAGE / 8)
#define GOLDEN          0x9e3779b97f4a7c15
#define FNV_OFFSET      0xcbf29ce484222325
#define FNV_PRIME       0x100000001b3

/* h = (h ^ reg) * FNV_PRIME, with h in r13 and FNV_PRIME in r9 */
#define FOLD(reg)       xor reg, %r13; imul %r9, %r13

        .code64
        .section .text.entry, "ax"
        .globl _start
_start:
        cli
        cld
        /* r15 = end of RAM, from the e820 table (rsi = boot_params) */
        xor     %r15, %r15
        movzbl  E820_ENTRIES(%rsi), %ecx
        lea     E820_TABLE(%rsi), %rbx
1:      test    %ecx, %ecx
        jz      3f
        cmpl    $E820_RAM, 16(%rbx)
        jne     2f
        mov     (%rbx), %rax
        add     8(%rbx), %rax
        cmp     %r15, %rax
        cmova   %rax, %r15
2:      add     $E820_ENTRY_SIZE, %rbx
        dec     %ecx
        jmp     1b
3:      mov     $MAPPED_END, %rax
        cmp     %rax, %r15
        cmova   %rax, %r15
        and     $~(PAGE - 1), %r15
        cmp     $FILL_START + PAGE, %r15
        jb      fail

        /* the reference page: word at address a = mix(a) */
        mov     $REF, %rdi
        movabs  $GOLDEN, %r8
4:      mov     %rdi, %rax
        imul    %r8, %rax
        mov     %rax, %rdx
        shr     $29, %rdx
        xor     %rdx, %rax
        mov     %rax, (%rdi)
        add     $8, %rdi
        cmp     $REF + PAGE, %rdi
        jb      4b

        /* fill: each page a copy of REF, its own address in its first word */
        mov     $FILL_START, %rbx
5:      mov     $REF, %rsi
        mov     %rbx, %rdi
        mov     $WORDS, %ecx
        rep movsq
        mov     %rbx, (%rbx)
        add     $PAGE, %rbx
        cmp     %r15, %rbx
        jb      5b

        xor     %r14d, %r14d                /* the iteration number */
again:
        lea     msg_begin(%rip), %rsi
        call    puts
        mov     %r14, %rax
        call    puthex
        mov     $'\n', %al
        call    putc

        movabs  $FNV_OFFSET, %r13
        movabs  $FNV_PRIME, %r9
        mov     $FILL_START, %rbx
6:      mov     (%rbx), %rax                /* the page's first word: its address */
        FOLD(%rax)
        lea     8(%rbx), %rdi
        mov     $REF + 8, %rsi
        mov     $WORDS - 1, %ecx
        repe cmpsq                          /* stops after the first word that differs */
        setne   %al
        movzbl  %al, %eax
        lea     (%rax, %rcx, 2), %rax       /* 2 * words left + (the last one differed) */
        FOLD(%rax)
        mov     -8(%rdi), %rax              /* the last word compared */
        FOLD(%rax)
        add     $PAGE, %rbx
        cmp     %r15, %rbx
        jb      6b

        lea     msg_hash(%rip), %rsi
        call    puts
        mov     %r14, %rax
        call    puthex
        mov     $' ', %al
        call    putc
        mov     %r13, %rax
        call    puthex
        mov     $' ', %al
        call    putc
        mov     %r15, %rax
        sub     $FILL_START, %rax
        shr     $12, %rax
        call    puthex
        mov     $'\n', %al
        call    putc

        inc     %r14
        mov     $COM1_LSR, %dx
7:      inb     %dx, %al                    /* wait for a byte from the host */
        test    $1, %al
        jz      7b
        mov     $COM1, %dx
        inb     %dx, %al
        jmp     again

fail:
        lea     msg_fail(%rip), %rsi
        call    puts
8:      hlt
        jmp     8b

/* putc: the byte in al to COM1 (Firecracker's transmitter never fills up) */
putc:
        mov     $COM1, %dx
        outb    %al, %dx
        ret

/* puts: the NUL-terminated string at rsi */
puts:
        movb    (%rsi), %al
        test    %al, %al
        jz      9f
        call    putc
        inc     %rsi
        jmp     puts
9:      ret

/* puthex: rax as 16 hex digits */
puthex:
        mov     %rax, %r10
        mov     $16, %r11d
10:     rol     $4, %r10
        mov     %r10d, %eax
        and     $0xf, %eax
        cmp     $10, %al
        jb      11f
        add     $'a' - '0' - 10, %al
11:     add     $'0', %al
        call    putc
        dec     %r11d
        jnz     10b
        ret

        .section .rodata
msg_begin:      .asciz "begin "
msg_hash:       .asciz "hash "
msg_fail:       .asciz "fail: no RAM above 2 MiB in the e820 table\n"
