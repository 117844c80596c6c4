//! A small eBPF assembler: just the instructions the fast-path program uses,
//! with named labels so jumps stay right when the program changes.
//!
//! Encoding (linux/bpf.h, `struct bpf_insn`): opcode byte, dst and src
//! register nibbles, a signed 16-bit offset and a signed 32-bit immediate.

use std::collections::HashMap;

pub const R0: u8 = 0;
pub const R1: u8 = 1;
pub const R2: u8 = 2;
pub const R3: u8 = 3;
pub const R4: u8 = 4;
pub const R6: u8 = 6;
pub const R7: u8 = 7;
pub const R8: u8 = 8;
pub const R9: u8 = 9;
/// The read-only frame pointer; the stack is below it.
pub const FP: u8 = 10;

/// Access sizes of loads and stores.
#[derive(Clone, Copy)]
pub enum Size {
    B = 0x10,
    H = 0x08,
    W = 0x00,
    DW = 0x18,
}

/// Jump conditions (immediate or register operand, unsigned compares).
#[derive(Clone, Copy)]
pub enum Cond {
    Eq = 0x10,
    Gt = 0x20,
    Ne = 0x50,
    Lt = 0xa0,
    Le = 0xb0,
}

const LDX_MEM: u8 = 0x61; // BPF_LDX | BPF_MEM, size added
const STX_MEM: u8 = 0x63;
const ST_MEM: u8 = 0x62;
const ALU64_K: u8 = 0x07;
const ALU64_X: u8 = 0x0f;
const MOV: u8 = 0xb0;
const ADD: u8 = 0x00;
const AND: u8 = 0x50;
const SUB: u8 = 0x10;
const JMP_K: u8 = 0x05;
const JMP_X: u8 = 0x0d;
const JA: u8 = 0x05;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
/// src_reg of an LD_IMM64 whose immediate is a map file descriptor.
const PSEUDO_MAP_FD: u8 = 1;

#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

/// A program being assembled.
#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<&'static str, usize>,
    /// (instruction index, label) of jumps to resolve.
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn push(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            dst,
            src,
            off,
            imm,
        });
    }

    /// Marks the next instruction as `name`.
    pub fn label(&mut self, name: &'static str) {
        let prev = self.labels.insert(name, self.insns.len());
        assert!(prev.is_none(), "label {name} defined twice");
    }

    pub fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.push(ALU64_K | MOV, dst, 0, 0, imm);
    }
    pub fn mov(&mut self, dst: u8, src: u8) {
        self.push(ALU64_X | MOV, dst, src, 0, 0);
    }
    pub fn add_imm(&mut self, dst: u8, imm: i32) {
        self.push(ALU64_K | ADD, dst, 0, 0, imm);
    }
    pub fn sub_imm(&mut self, dst: u8, imm: i32) {
        self.push(ALU64_K | SUB, dst, 0, 0, imm);
    }
    pub fn and_imm(&mut self, dst: u8, imm: i32) {
        self.push(ALU64_K | AND, dst, 0, 0, imm);
    }
    pub fn and(&mut self, dst: u8, src: u8) {
        self.push(ALU64_X | AND, dst, src, 0, 0);
    }
    /// `dst = *(size *)(src + off)`
    pub fn load(&mut self, size: Size, dst: u8, src: u8, off: i16) {
        self.push(LDX_MEM | size as u8, dst, src, off, 0);
    }
    /// `*(size *)(dst + off) = src`
    pub fn store(&mut self, size: Size, dst: u8, off: i16, src: u8) {
        self.push(STX_MEM | size as u8, dst, src, off, 0);
    }
    /// `*(size *)(dst + off) = imm` (stack only in this program).
    pub fn store_imm(&mut self, size: Size, dst: u8, off: i16, imm: i32) {
        self.push(ST_MEM | size as u8, dst, 0, off, imm);
    }
    /// Loads a map's file descriptor into `dst` (two instruction slots).
    pub fn load_map(&mut self, dst: u8, fd: i32) {
        self.push(LD_IMM64, dst, PSEUDO_MAP_FD, 0, fd);
        self.push(0, 0, 0, 0, 0);
    }
    pub fn jump(&mut self, to: &'static str) {
        self.fixups.push((self.insns.len(), to));
        self.push(JMP_K | JA, 0, 0, 0, 0);
    }
    /// `if dst <cond> imm goto to`
    pub fn jump_if(&mut self, cond: Cond, dst: u8, imm: i32, to: &'static str) {
        self.fixups.push((self.insns.len(), to));
        self.push(JMP_K | cond as u8, dst, 0, 0, imm);
    }
    /// `if dst <cond> src goto to`
    pub fn jump_if_reg(&mut self, cond: Cond, dst: u8, src: u8, to: &'static str) {
        self.fixups.push((self.insns.len(), to));
        self.push(JMP_X | cond as u8, dst, src, 0, 0);
    }
    pub fn call(&mut self, helper: i32) {
        self.push(CALL, 0, 0, 0, helper);
    }
    pub fn exit(&mut self) {
        self.push(EXIT, 0, 0, 0, 0);
    }

    /// Resolves the labels and returns the encoded instructions.
    pub fn finish(mut self) -> Vec<u64> {
        for (at, name) in std::mem::take(&mut self.fixups) {
            let target = *self
                .labels
                .get(name)
                .unwrap_or_else(|| panic!("jump to undefined label {name}"));
            let off = target as i64 - at as i64 - 1;
            self.insns[at].off = i16::try_from(off).expect("jump within 32k instructions");
        }
        self.insns
            .iter()
            .map(|i| {
                u64::from(i.code)
                    | u64::from(i.dst | (i.src << 4)) << 8
                    | u64::from(i.off as u16) << 16
                    | u64::from(i.imm as u32) << 32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_kernel_headers() {
        let mut a = Asm::default();
        a.mov_imm(R0, -1); // BPF_MOV64_IMM(BPF_REG_0, -1)
        a.load(Size::W, R2, R6, 76); // BPF_LDX_MEM(BPF_W, R2, R6, 76)
        a.jump_if(Cond::Ne, R2, 0, "out");
        a.label("out");
        a.exit();
        let code = a.finish();
        assert_eq!(code[0], 0xffff_ffff_0000_00b7);
        assert_eq!(code[1], 0x0000_0000_004c_6261);
        assert_eq!(code[2], 0x0000_0000_0000_0255); // off 0: the next instruction
        assert_eq!(code[3], 0x95);
    }
}
