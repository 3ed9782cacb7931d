# consolegate-tests serial guest: a 512-byte boot sector.
# Initialises COM1 (0x3F8) to 115200 8N1 with FIFOs, prints the banner every
# 4 timer ticks (~220 ms) until a byte arrives, then echoes every byte.
# Waits with HLT (woken by the BIOS timer IRQ) so TCG idles instead of
# spinning. Build: as --32 -o boot.o boot.S && objcopy -O binary -j .text boot.o boot.img
    .code16
    .intel_syntax noprefix
    .text
    .globl _start
_start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    mov dx, 0x3f9
    xor al, al
    out dx, al
    mov dx, 0x3fb
    mov al, 0x80
    out dx, al
    mov dx, 0x3f8
    mov al, 1
    out dx, al
    mov dx, 0x3f9
    xor al, al
    out dx, al
    mov dx, 0x3fb
    mov al, 3
    out dx, al
    mov dx, 0x3fa
    mov al, 0xc7
    out dx, al
    mov dx, 0x3fc
    mov al, 3
    out dx, al
banner_loop:
    mov si, offset banner - _start + 0x7c00
print:
    lodsb
    test al, al
    jz wait_start
    call putc
    jmp print
wait_start:
    mov bx, word ptr [0x46c]
wait:
    mov dx, 0x3fd
    in al, dx
    test al, 1
    jnz echo
    hlt
    mov ax, word ptr [0x46c]
    sub ax, bx
    cmp ax, 4
    jb wait
    jmp banner_loop
echo:
    mov dx, 0x3fd
    in al, dx
    test al, 1
    jnz echo_byte
    hlt
    jmp echo
echo_byte:
    mov dx, 0x3f8
    in al, dx
    call putc
    jmp echo
putc:
    mov ah, al
    mov dx, 0x3fd
putc_wait:
    in al, dx
    test al, 0x20
    jz putc_wait
    mov dx, 0x3f8
    mov al, ah
    out dx, al
    ret
banner:
    .asciz "consolegate-serial-ready\r\n"
    .org 510
    .byte 0x55, 0xaa
