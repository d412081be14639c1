//! A minimal reader of BTF type information: the offsets and sizes of named members of a struct
//! (through anonymous unions and structs), which aya does not expose. The TCP probe's raw
//! tracepoint and kprobe paths use it for `struct sock` when the kernel has BTF (or
//! `--btf-path` names a file).
//!
//! Format: <https://docs.kernel.org/bpf/btf.html> (header, type section, string section).

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// One member of a struct or union.
#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Offset in bits.
    bit_offset: u32,
    /// Width of a bitfield in bits; 0 for a plain member.
    bitfield_size: u32,
}

/// Where a member is and how wide it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberBits {
    /// Offset from the start of the struct, in bits.
    pub bit_offset: u32,
    /// Width in bits: the bitfield's, else its type's size.
    pub bits: u32,
}

/// A parsed struct or union.
#[derive(Clone, Debug)]
struct Composite {
    members: Vec<Member>,
}

/// The structs and unions of a BTF blob, enough to resolve member offsets.
#[derive(Debug)]
pub struct Types<'a> {
    strings: &'a [u8],
    /// type id -> composite (only structs and unions are kept).
    composites: HashMap<u32, Composite>,
    /// struct name -> type id (the first one, for names that occur more than once).
    structs: HashMap<String, u32>,
    /// type id - 1 -> (kind, the header's size-or-type word), for member sizes.
    kinds: Vec<(u32, u32)>,
}

fn u32_at(d: &[u8], off: usize) -> Result<u32, String> {
    d.get(off..off + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| format!("BTF truncated at byte {off}"))
}

impl<'a> Types<'a> {
    /// Parses a little-endian BTF blob (e.g. /sys/kernel/btf/vmlinux).
    pub fn parse(data: &'a [u8]) -> Result<Self, String> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or("BTF too short")?;
        if magic != MAGIC {
            return Err(format!("not BTF (magic {magic:#x}, expected {MAGIC:#x})"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or("BTF type section out of bounds")?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or("BTF string section out of bounds")?;
        let mut t = Self {
            strings,
            composites: HashMap::new(),
            structs: HashMap::new(),
            kinds: Vec::new(),
        };
        let mut pos = 0;
        let mut id = 1u32;
        while pos < types.len() {
            let name_off = u32_at(types, pos)?;
            let info = u32_at(types, pos + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            t.kinds.push((kind, u32_at(types, pos + 8)?));
            pos += 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                _ => 0,
            };
            if kind == KIND_STRUCT || kind == KIND_UNION {
                let mut members = Vec::with_capacity(vlen);
                for i in 0..vlen {
                    let m = pos + i * 12;
                    let off = u32_at(types, m + 8)?;
                    members.push(Member {
                        name_off: u32_at(types, m)?,
                        type_id: u32_at(types, m + 4)?,
                        // With kind_flag the top 8 bits hold a bitfield's size.
                        bit_offset: if kind_flag { off & 0x00ff_ffff } else { off },
                        bitfield_size: if kind_flag { off >> 24 } else { 0 },
                    });
                }
                if kind == KIND_STRUCT && name_off != 0 {
                    let name = t.string(name_off)?;
                    t.structs.entry(name).or_insert(id);
                }
                t.composites.insert(id, Composite { members });
            }
            pos += extra;
            id += 1;
        }
        Ok(t)
    }

    fn string(&self, off: u32) -> Result<String, String> {
        let s = self
            .strings
            .get(off as usize..)
            .ok_or_else(|| format!("BTF string offset {off} out of bounds"))?;
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        Ok(String::from_utf8_lossy(&s[..end]).into_owned())
    }

    /// Byte offset of member `name` of struct `strukt`, looking into anonymous unions and
    /// structs (as C does). `Err` names what is missing.
    pub fn member_offset(&self, strukt: &str, name: &str) -> Result<u32, String> {
        Ok(self.locate(strukt, name)?.0 / 8)
    }

    /// Offset and width of member `name` of struct `strukt` (see [`Self::member_offset`]).
    pub fn member_bits(&self, strukt: &str, name: &str) -> Result<MemberBits, String> {
        let (bit_offset, m) = self.locate(strukt, name)?;
        let bits = if m.bitfield_size != 0 {
            m.bitfield_size
        } else {
            self.type_size(m.type_id, 0)
                .map(|b| b * 8)
                .ok_or_else(|| format!("BTF: no size for the type of {strukt}.{name}"))?
        };
        Ok(MemberBits { bit_offset, bits })
    }

    /// Member `name` of struct `strukt` and its offset in bits.
    fn locate(&self, strukt: &str, name: &str) -> Result<(u32, Member), String> {
        let id = *self
            .structs
            .get(strukt)
            .ok_or_else(|| format!("BTF has no struct {strukt}"))?;
        self.find_member(id, name, 0, 0)?
            .ok_or_else(|| format!("BTF struct {strukt} has no member {name}"))
    }

    /// Size in bytes of type `id`, through typedefs and qualifiers (ints, enums, structs).
    fn type_size(&self, id: u32, depth: u32) -> Option<u32> {
        let &(kind, size_or_type) = self.kinds.get(usize::try_from(id).ok()?.checked_sub(1)?)?;
        match kind {
            KIND_INT | KIND_ENUM | KIND_STRUCT | KIND_UNION | KIND_ENUM64 => Some(size_or_type),
            KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST if depth < 16 => {
                self.type_size(size_or_type, depth + 1)
            }
            _ => None,
        }
    }

    /// The member and its offset in bits from the outermost struct.
    fn find_member(
        &self,
        id: u32,
        name: &str,
        base: u32,
        depth: u32,
    ) -> Result<Option<(u32, Member)>, String> {
        if depth > 8 {
            return Ok(None);
        }
        let Some(c) = self.composites.get(&id) else {
            return Ok(None);
        };
        for m in &c.members {
            if m.name_off == 0 {
                if let Some(found) =
                    self.find_member(m.type_id, name, base + m.bit_offset, depth + 1)?
                {
                    return Ok(Some(found));
                }
            } else if self.string(m.name_off)? == name {
                return Ok(Some((base + m.bit_offset, *m)));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `unsigned int` (id 1), `typedef unsigned int u32_t` (id 2) and
    /// `struct sock { u32_t sk_hash; unsigned int sk_kern_sock:1, ..., sk_protocol:8,
    /// sk_type:16; }` (id 3, with bitfield sizes: kind_flag set), as pahole writes 5.2-5.5
    /// kernels' sk_protocol.
    fn bitfield_btf() -> Vec<u8> {
        let mut strings = b"\0unsigned int\0u32_t\0sock\0sk_hash\0sk_protocol\0sk_type\0".to_vec();
        let name = |s: &str, strings: &[u8]| {
            let needle = [s.as_bytes(), b"\0"].concat();
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_slice())
                .map(|p| u32::try_from(p).unwrap())
                .unwrap()
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // [1] INT "unsigned int", size 4, encoding: 32 bits.
        push(&[name("unsigned int", &strings), KIND_INT << 24, 4, 32]);
        // [2] TYPEDEF u32_t -> 1.
        push(&[name("u32_t", &strings), KIND_TYPEDEF << 24, 1]);
        // [3] STRUCT sock, kind_flag, 3 members, size 8.
        push(&[
            name("sock", &strings),
            (1 << 31) | (KIND_STRUCT << 24) | 3,
            8,
        ]);
        push(&[name("sk_hash", &strings), 2, 0]);
        push(&[name("sk_protocol", &strings), 1, (8 << 24) | 40]);
        push(&[name("sk_type", &strings), 1, (16 << 24) | 48]);
        strings.push(0);
        let mut out = Vec::new();
        for w in [0x0001_eb9f_u32, 24, 0, u32::try_from(types.len()).unwrap()] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for w in [
            u32::try_from(types.len()).unwrap(),
            u32::try_from(strings.len()).unwrap(),
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn member_widths_of_bitfields_and_typedefs() {
        let data = bitfield_btf();
        let t = Types::parse(&data).unwrap();
        assert_eq!(
            t.member_bits("sock", "sk_protocol"),
            Ok(MemberBits {
                bit_offset: 40,
                bits: 8
            })
        );
        assert_eq!(
            t.member_bits("sock", "sk_type"),
            Ok(MemberBits {
                bit_offset: 48,
                bits: 16
            })
        );
        // A plain member: its width through the typedef.
        assert_eq!(
            t.member_bits("sock", "sk_hash"),
            Ok(MemberBits {
                bit_offset: 0,
                bits: 32
            })
        );
        assert_eq!(t.member_offset("sock", "sk_protocol"), Ok(5));
        assert!(t.member_bits("sock", "nope").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(Types::parse(b"").is_err());
        assert!(Types::parse(&[0u8; 64]).unwrap_err().contains("not BTF"));
    }

    /// On this machine's kernel (when it has BTF): the struct sock_common offsets the kprobe TCP
    /// path would read.
    #[test]
    fn reads_sock_common_from_the_kernel() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("no kernel BTF here: skipped");
            return;
        };
        let t = Types::parse(&data).unwrap();
        assert_eq!(t.member_offset("sock_common", "skc_daddr"), Ok(0));
        assert_eq!(t.member_offset("sock_common", "skc_family"), Ok(16));
        assert!(t.member_offset("sock_common", "nope").is_err());
        // A plain member, its width from its type (through typedefs).
        assert_eq!(
            t.member_bits("sock_common", "skc_family"),
            Ok(MemberBits {
                bit_offset: 128,
                bits: 16
            })
        );
        // sk_protocol: a u16 since Linux 5.6 (this machine runs a newer kernel).
        let p = t.member_bits("sock", "sk_protocol").unwrap();
        assert_eq!(p.bits, 16);
        assert_eq!(p.bit_offset % 8, 0);
        assert!(t.member_offset("no_such_struct", "x").is_err());
    }
}
