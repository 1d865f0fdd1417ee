/* Tiny multiboot guest for the real live-migration tests and benchmark.
 *
 * Description
 *   Boots from QEMU's -kernel, reads "fill=MB dirty=KBPS wss=MB hz=N" from its command line,
 *   writes non-zero data into the first `fill` MB above 4 MB (so every page of it must be
 *   migrated: QEMU sends all-zero pages nearly for free), then sleeps with `hlt` between PIT
 *   timer interrupts (100 Hz). On each tick it dirties dirty/100 KB of a `wss` MB working set
 *   (one write per 4 KB page, cycling), and once a second prints "hb N" on COM1, N counting up.
 *   The counter lives in guest RAM, so it continuing on the destination shows that the running
 *   state moved with the VM.
 * Requirements
 *   i386 multiboot loader (QEMU -kernel), a PC with PIT, 8259 PIC and a 16550 UART at 0x3F8.
 * Limitations
 *   Dirty rate is in guest (virtual) time: a host too busy to run the guest's ticks dirties less.
 */
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct mb_info { u32 flags, mem_lower, mem_upper, boot_device, cmdline; };

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

extern void irq0_stub(void);
static volatile u32 ticks;
static u32 idt[256 * 2];
static struct __attribute__((packed)) { u16 limit; u32 base; } idt_ptr;

void on_tick(void) { ticks++; }

static void putc(char c) {
    while (!(inb(0x3F8 + 5) & 0x20)) { }
    outb(0x3F8, (u8)c);
}
static void puts(const char *s) { while (*s) putc(*s++); }
static void putu(u32 v) {
    char b[12]; int i = 0;
    do { b[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i) putc(b[--i]);
}

static u32 arg(const char *cmd, const char *key, u32 dflt) {
    for (const char *p = cmd; p && *p; p++) {
        if (p != cmd && p[-1] != ' ') continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (*k || *q != '=') continue;
        u32 v = 0; q++;
        while (*q >= '0' && *q <= '9') v = v * 10 + (u32)(*q++ - '0');
        return v;
    }
    return dflt;
}

void kmain(u32 magic, struct mb_info *mbi) {
    const char *cmd = (magic == 0x2BADB002 && (mbi->flags & 4)) ? (const char *)mbi->cmdline : 0;
    u32 mem_mb = (magic == 0x2BADB002 && (mbi->flags & 1)) ? (mbi->mem_upper / 1024 + 1) : 16;
    u32 hz = arg(cmd, "hz", 100);
    u32 base = 4u << 20;                                  /* data area starts at 4 MB */
    u32 room = mem_mb > 6 ? mem_mb - 6 : 0;               /* keep clear of the top */
    u32 fill = arg(cmd, "fill", room);
    u32 wss = arg(cmd, "wss", 16);
    u32 dirty_kbps = arg(cmd, "dirty", 0);
    if (fill > room) fill = room;
    if (wss > room) wss = room;
    if (wss == 0) wss = 1;

    outb(0x3F8 + 1, 0x00); outb(0x3F8 + 3, 0x80); outb(0x3F8 + 0, 0x01);
    outb(0x3F8 + 1, 0x00); outb(0x3F8 + 3, 0x03); outb(0x3F8 + 2, 0xC7);

    /* Non-zero data in every page of the fill area (a word per 64 bytes). */
    for (u32 a = base; a < base + (fill << 20); a += 64) *(volatile u32 *)a = a ^ 0x5A5A5A5Au;
    puts("ready mem="); putu(mem_mb); puts(" fill="); putu(fill);
    puts(" dirty="); putu(dirty_kbps); puts(" wss="); putu(wss); puts("\n");

    /* IDT: vector 0x20 = IRQ0 (interrupt gate, selector 0x08). */
    u32 h = (u32)irq0_stub;
    idt[0x20 * 2] = (0x08u << 16) | (h & 0xFFFF);
    idt[0x20 * 2 + 1] = (h & 0xFFFF0000u) | 0x8E00u;
    idt_ptr.limit = sizeof(idt) - 1; idt_ptr.base = (u32)idt;
    __asm__ volatile("lidt %0" : : "m"(idt_ptr));
    /* 8259 PICs: remap to 0x20/0x28, unmask IRQ0 only. */
    outb(0x20, 0x11); outb(0xA0, 0x11); outb(0x21, 0x20); outb(0xA1, 0x28);
    outb(0x21, 0x04); outb(0xA1, 0x02); outb(0x21, 0x01); outb(0xA1, 0x01);
    outb(0x21, 0xFE); outb(0xA1, 0xFF);
    /* PIT channel 0, mode 2, hz interrupts a second. */
    u32 div = 1193182 / hz;
    outb(0x43, 0x34); outb(0x40, (u8)(div & 0xFF)); outb(0x40, (u8)(div >> 8));

    u32 pages_wss = wss << 8, cursor = 0, seen = 0, beat = 0;
    u32 per_tick_x100 = dirty_kbps * 100 / 4 / hz;        /* pages a tick, x100 */
    u32 debt_x100 = 0, gen = 1;
    for (;;) {
        __asm__ volatile("sti; hlt; cli");
        while (seen != ticks) {
            seen++;
            debt_x100 += per_tick_x100;
            while (debt_x100 >= 100) {
                debt_x100 -= 100;
                *(volatile u32 *)(base + (cursor << 12)) = gen;
                if (++cursor == pages_wss) { cursor = 0; gen++; }
            }
            if (seen % hz == 0) { puts("hb "); putu(++beat); puts("\n"); }
        }
    }
}
