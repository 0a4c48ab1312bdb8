/* Bench: what a probe costs on each class of instruction. Each ic_* function
 * starts with the instruction named after it; a probe on the function's
 * first byte sits on that instruction. The kernel emulates push, nop, call
 * and jmp, and single-steps the others (arch/x86/kernel/uprobes.c).
 * Usage: insn CALLS. Prints one line per class: `class=NAME calls=N loop_ns=T`. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__asm__(
    ".text\n"
    ".p2align 4\n.globl ic_leaf\n.type ic_leaf,@function\nic_leaf:\n ret\n.size ic_leaf,.-ic_leaf\n"
    ".p2align 4\n.globl ic_push\n.type ic_push,@function\nic_push:\n push %rbp\n pop %rbp\n ret\n.size ic_push,.-ic_push\n"
    ".p2align 4\n.globl ic_nop\n.type ic_nop,@function\nic_nop:\n nop\n ret\n.size ic_nop,.-ic_nop\n"
    ".p2align 4\n.globl ic_nop5\n.type ic_nop5,@function\nic_nop5:\n nopl 0x0(%rax,%rax,1)\n ret\n.size ic_nop5,.-ic_nop5\n"
    ".p2align 4\n.globl ic_call\n.type ic_call,@function\nic_call:\n call ic_leaf\n ret\n.size ic_call,.-ic_call\n"
    ".p2align 4\n.globl ic_jmp\n.type ic_jmp,@function\nic_jmp:\n jmp ic_leaf\n.size ic_jmp,.-ic_jmp\n"
    ".p2align 4\n.globl ic_ret\n.type ic_ret,@function\nic_ret:\n ret\n.size ic_ret,.-ic_ret\n"
    ".p2align 4\n.globl ic_endbr64\n.type ic_endbr64,@function\nic_endbr64:\n endbr64\n ret\n.size ic_endbr64,.-ic_endbr64\n"
    ".p2align 4\n.globl ic_mov\n.type ic_mov,@function\nic_mov:\n mov %rdi,%rax\n ret\n.size ic_mov,.-ic_mov\n"
    ".p2align 4\n.globl ic_sub\n.type ic_sub,@function\nic_sub:\n sub $8,%rsp\n add $8,%rsp\n ret\n.size ic_sub,.-ic_sub\n"
    ".p2align 4\n.globl ic_uret\n.type ic_uret,@function\nic_uret:\n push %rbp\n pop %rbp\n ret\n.size ic_uret,.-ic_uret\n");

typedef long (*probe_fn)(long);
extern long ic_push(long), ic_nop(long), ic_nop5(long), ic_call(long), ic_jmp(long),
    ic_ret(long), ic_endbr64(long), ic_mov(long), ic_sub(long), ic_uret(long);

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
    long calls = argc > 1 ? atol(argv[1]) : 100000;
    static const struct {
        const char *name;
        probe_fn fn;
    } classes[] = {
        {"push", ic_push}, {"nop", ic_nop},       {"nop5", ic_nop5}, {"call", ic_call},
        {"jmp", ic_jmp},   {"ret", ic_ret},       {"endbr64", ic_endbr64},
        {"mov", ic_mov},   {"sub", ic_sub},       {"uretprobe", ic_uret},
    };
    for (size_t c = 0; c < sizeof classes / sizeof classes[0]; c++) {
        probe_fn volatile fn = classes[c].fn;
        long long start = now_ns();
        for (long i = 0; i < calls; i++) fn(i);
        printf("class=%s calls=%ld loop_ns=%lld\n", classes[c].name, calls, now_ns() - start);
    }
    return 0;
}
