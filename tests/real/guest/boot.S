/* Multiboot (v1) entry of the test guest: own flat GDT, a stack, then kmain(magic, info).
 * irq0_stub is the PIT timer interrupt handler (IDT vector 0x20), installed by guest.c. */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003          /* align modules, provide memory info */
    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

    .section .data
    .align 8
gdt:
    .quad 0x0000000000000000
    .quad 0x00CF9A000000FFFF            /* 0x08: flat 32-bit code */
    .quad 0x00CF92000000FFFF            /* 0x10: flat 32-bit data */
gdt_ptr:
    .word gdt_ptr - gdt - 1
    .long gdt

    .section .bss
    .align 16
stack_bottom:
    .skip 16384
stack_top:

    .section .text
    .global _start
_start:
    cli
    mov $stack_top, %esp
    lgdt gdt_ptr
    ljmp $0x08, $1f
1:  mov $0x10, %cx
    mov %cx, %ds
    mov %cx, %es
    mov %cx, %fs
    mov %cx, %gs
    mov %cx, %ss
    push %ebx                           /* multiboot info */
    push %eax                           /* multiboot magic */
    call kmain
2:  cli
    hlt
    jmp 2b

    .global irq0_stub
irq0_stub:
    pusha
    call on_tick
    mov $0x20, %al                      /* EOI to the master PIC */
    out %al, $0x20
    popa
    iret
