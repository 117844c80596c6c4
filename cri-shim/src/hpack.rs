//! An HPACK (RFC 7541) decoder for the frame relay: it reads header blocks
//! and keeps the dynamic table in step with the peer's encoder, and never
//! encodes (the relay forwards blocks as they came).
//!
//! Why not a crate: h2 keeps its codec private, and the hpack crates that
//! expose one (hpack, loona-hpack) build a hash map of the whole Huffman
//! table for every Huffman-coded string, which under callgrind cost the
//! relay about three times the instructions per call of ending HTTP/2 with
//! h2. Here the canonical Huffman code is decoded from per-length tables
//! computed at compile time.

use std::borrow::Cow;
use std::collections::VecDeque;

/// What made a header block undecodable (the peer's decoder fails the same
/// way and ends the connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    Truncated,
    IntegerOverflow,
    BadIndex(usize),
    BadHuffman,
    TableSizeAboveLimit,
}

/// RFC 7541 4.1: each entry counts its name and value plus 32 bytes.
const ENTRY_OVERHEAD: usize = 32;
/// The default SETTINGS_HEADER_TABLE_SIZE.
const DEFAULT_TABLE: usize = 4096;

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

#[derive(Debug)]
pub struct Decoder {
    /// Newest first (index 62 is `table[0]`).
    table: VecDeque<Entry>,
    size: usize,
    max: usize,
    /// Largest size an update may set. The peer's encoder is bound by our
    /// side's SETTINGS, which the relay does not read; it passes whatever
    /// a peer agreed to, up to this bound on memory.
    limit: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max: DEFAULT_TABLE,
            limit: 1 << 20,
        }
    }
}

impl Decoder {
    /// Decodes one complete header block, calling `f` with each field.
    pub fn decode(&mut self, mut b: &[u8], mut f: impl FnMut(&[u8], &[u8])) -> Result<(), Error> {
        while let Some(&first) = b.first() {
            if first & 0x80 != 0 {
                let (i, rest) = integer(b, 7)?;
                b = rest;
                let (n, v) = self.entry(i)?;
                f(n, v);
            } else if first & 0x40 != 0 {
                let (name, v, rest) = self.literal(b, 6)?;
                b = rest;
                f(&name, &v);
                self.insert(name.into_owned().into(), v.into_owned().into());
            } else if first & 0x20 != 0 {
                let (size, rest) = integer(b, 5)?;
                b = rest;
                if size > self.limit {
                    return Err(Error::TableSizeAboveLimit);
                }
                self.max = size;
                self.evict(0);
            } else {
                // Without indexing (0000) or never indexed (0001).
                let (name, v, rest) = self.literal(b, 4)?;
                b = rest;
                f(&name, &v);
            }
        }
        Ok(())
    }

    fn entry(&self, i: usize) -> Result<(&[u8], &[u8]), Error> {
        match i {
            1..=61 => Ok(STATIC[i - 1]),
            _ => self
                .table
                .get(i.wrapping_sub(62))
                .map(|(n, v)| (&**n, &**v))
                .ok_or(Error::BadIndex(i)),
        }
    }

    /// A literal field: its name (indexed, or a string), its value, and
    /// the rest of the block.
    #[allow(clippy::type_complexity)]
    fn literal<'b>(
        &self,
        b: &'b [u8],
        prefix: u8,
    ) -> Result<(Cow<'b, [u8]>, Cow<'b, [u8]>, &'b [u8]), Error> {
        let (i, rest) = integer(b, prefix)?;
        let (name, rest) = if i == 0 {
            string(rest)?
        } else {
            (Cow::Owned(self.entry(i)?.0.to_vec()), rest)
        };
        let (value, rest) = string(rest)?;
        Ok((name, value, rest))
    }

    fn insert(&mut self, name: Box<[u8]>, value: Box<[u8]>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        // An entry larger than the table empties it and is not added.
        self.evict(size);
        if size <= self.max {
            self.size += size;
            self.table.push_front((name, value));
        }
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((n, v)) = self.table.pop_back() else {
                break;
            };
            self.size -= n.len() + v.len() + ENTRY_OVERHEAD;
        }
    }
}

/// RFC 7541 5.1: an integer with an N-bit prefix.
fn integer(b: &[u8], prefix: u8) -> Result<(usize, &[u8]), Error> {
    let (&first, mut rest) = b.split_first().ok_or(Error::Truncated)?;
    let max = (1usize << prefix) - 1;
    let mut v = usize::from(first) & max;
    if v < max {
        return Ok((v, rest));
    }
    let mut shift = 0;
    loop {
        let (&byte, r) = rest.split_first().ok_or(Error::Truncated)?;
        rest = r;
        if shift > 28 {
            return Err(Error::IntegerOverflow);
        }
        v += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok((v, rest));
        }
    }
}

/// RFC 7541 5.2: a string literal, Huffman-coded or not.
fn string(b: &[u8]) -> Result<(Cow<'_, [u8]>, &[u8]), Error> {
    let huffman = b.first().ok_or(Error::Truncated)? & 0x80 != 0;
    let (len, rest) = integer(b, 7)?;
    if rest.len() < len {
        return Err(Error::Truncated);
    }
    let (s, rest) = rest.split_at(len);
    if huffman {
        Ok((Cow::Owned(huffman_decode(s)?), rest))
    } else {
        Ok((Cow::Borrowed(s), rest))
    }
}

/// The canonical Huffman code of Appendix B as per-length ranges: codes of
/// length `l` are `FIRST[l] .. FIRST[l] + COUNT[l]`, for the symbols
/// `SYMBOLS[OFFSET[l]..]` in order.
struct Canonical {
    first: [u32; 31],
    count: [u32; 31],
    offset: [usize; 31],
    symbols: [u16; 257],
}

const HUFFMAN: Canonical = canonical();

const fn canonical() -> Canonical {
    let mut c = Canonical {
        first: [0; 31],
        count: [0; 31],
        offset: [0; 31],
        symbols: [0; 257],
    };
    let mut s = 0;
    while s < 257 {
        c.count[CODES[s].1 as usize] += 1;
        s += 1;
    }
    let mut l = 1;
    let mut at = 0;
    while l < 31 {
        c.offset[l] = at;
        at += c.count[l] as usize;
        l += 1;
    }
    // Within one length the code's values follow the symbols' order.
    let mut fill = c.offset;
    s = 0;
    while s < 257 {
        let l = CODES[s].1 as usize;
        c.symbols[fill[l]] = s as u16;
        fill[l] += 1;
        s += 1;
    }
    l = 1;
    while l < 31 {
        if c.count[l] > 0 {
            c.first[l] = CODES[c.symbols[c.offset[l]] as usize].0;
        }
        l += 1;
    }
    c
}

/// Symbols whose code is at most 8 bits, by the next 8 bits of input:
/// (symbol, code length), length 0 where a longer code starts. Most
/// characters of paths and header values decode with one lookup.
const SHORT: [(u8, u8); 256] = short_codes();

const fn short_codes() -> [(u8, u8); 256] {
    let mut t = [(0u8, 0u8); 256];
    let mut s = 0;
    while s < 256 {
        let (code, len) = CODES[s];
        if len <= 8 {
            let first = (code << (8 - len)) as usize;
            let mut k = 0;
            while k < 1 << (8 - len) {
                t[first + k] = (s as u8, len);
                k += 1;
            }
        }
        s += 1;
    }
    t
}

fn huffman_decode(b: &[u8]) -> Result<Vec<u8>, Error> {
    let h = &HUFFMAN;
    let mut out = Vec::with_capacity(b.len() * 8 / 5);
    // Unread bits, left-aligned in `acc`.
    let (mut acc, mut bits, mut next) = (0u64, 0usize, 0);
    loop {
        while bits <= 56 && next < b.len() {
            acc |= u64::from(b[next]) << (56 - bits);
            bits += 8;
            next += 1;
        }
        if bits == 0 {
            return Ok(out);
        }
        let (sym, len) = SHORT[(acc >> 56) as usize];
        if len > 0 && usize::from(len) <= bits {
            out.push(sym);
            acc <<= len;
            bits -= usize::from(len);
            continue;
        }
        // A longer code (at most 30 bits), or the end's padding.
        let mut found = false;
        for len in 9..=bits.min(30) {
            let code = (acc >> (64 - len)) as u32;
            let i = code.wrapping_sub(h.first[len]);
            if code >= h.first[len] && i < h.count[len] {
                let sym = h.symbols[h.offset[len] + i as usize];
                if sym == 256 {
                    // EOS inside a string is an error (RFC 7541 5.2).
                    return Err(Error::BadHuffman);
                }
                out.push(sym as u8);
                acc <<= len;
                bits -= len;
                found = true;
                break;
            }
        }
        if !found {
            // Padding: fewer than 8 bits, all ones (the start of EOS).
            if bits > 7 || acc >> (64 - bits) != (1 << bits) - 1 {
                return Err(Error::BadHuffman);
            }
            return Ok(out);
        }
    }
}

/// RFC 7541 Appendix A: the static table (index 1 first).
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// RFC 7541 Appendix B: (code, length in bits) of symbols 0..=256 (256 is EOS).
#[rustfmt::skip]
const CODES: [(u32, u8); 257] = [
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28), (0xfffffe4, 28), (0xfffffe5, 28),
    (0xfffffe6, 28), (0xfffffe7, 28), (0xfffffe8, 28), (0xffffea, 24), (0x3ffffffc, 30), (0xfffffe9, 28),
    (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28), (0xfffffec, 28), (0xfffffed, 28), (0xfffffee, 28),
    (0xfffffef, 28), (0xffffff0, 28), (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28),
    (0xffffff4, 28), (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28), (0xffffff8, 28), (0xffffff9, 28),
    (0xffffffa, 28), (0xffffffb, 28), (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12),
    (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11), (0x3fa, 10), (0x3fb, 10),
    (0xf9, 8), (0x7fb, 11), (0xfa, 8), (0x16, 6), (0x17, 6), (0x18, 6),
    (0x0, 5), (0x1, 5), (0x2, 5), (0x19, 6), (0x1a, 6), (0x1b, 6),
    (0x1c, 6), (0x1d, 6), (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8),
    (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10), (0x1ffa, 13), (0x21, 6),
    (0x5d, 7), (0x5e, 7), (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7),
    (0x63, 7), (0x64, 7), (0x65, 7), (0x66, 7), (0x67, 7), (0x68, 7),
    (0x69, 7), (0x6a, 7), (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7),
    (0x6f, 7), (0x70, 7), (0x71, 7), (0x72, 7), (0xfc, 8), (0x73, 7),
    (0xfd, 8), (0x1ffb, 13), (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14), (0x22, 6),
    (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5), (0x24, 6), (0x5, 5),
    (0x25, 6), (0x26, 6), (0x27, 6), (0x6, 5), (0x74, 7), (0x75, 7),
    (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5), (0x2b, 6), (0x76, 7),
    (0x2c, 6), (0x8, 5), (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7),
    (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15), (0x7fc, 11), (0x3ffd, 14),
    (0x1ffd, 13), (0xffffffc, 28), (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20),
    (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22), (0x7fffd9, 23), (0x3fffd6, 22), (0x7fffda, 23),
    (0x7fffdb, 23), (0x7fffdc, 23), (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23),
    (0xffffec, 24), (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23), (0xffffee, 24), (0x7fffe1, 23),
    (0x7fffe2, 23), (0x7fffe3, 23), (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23),
    (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24), (0x3fffda, 22), (0x1fffdd, 21),
    (0xfffe9, 20), (0x3fffdb, 22), (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21),
    (0x7fffea, 23), (0x3fffdd, 22), (0x3fffde, 22), (0xfffff0, 24), (0x1fffdf, 21), (0x3fffdf, 22),
    (0x7fffeb, 23), (0x7fffec, 23), (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21),
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23), (0xfffea, 20), (0x3fffe2, 22),
    (0x3fffe3, 22), (0x3fffe4, 22), (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23),
    (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20), (0x7fff1, 19), (0x3fffe7, 22), (0x7ffff2, 23),
    (0x3fffe8, 22), (0x1ffffec, 25), (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27),
    (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25), (0x7fff2, 19), (0x1fffe3, 21),
    (0x3ffffe6, 26), (0x7ffffe0, 27), (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27), (0xfffff2, 24),
    (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26), (0xffffffd, 28), (0x7ffffe3, 27),
    (0x7ffffe4, 27), (0x7ffffe5, 27), (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21),
    (0x3fffe9, 22), (0x1fffe7, 21), (0x1fffe8, 21), (0x7ffff3, 23), (0x3fffea, 22), (0x3fffeb, 22),
    (0x1ffffee, 25), (0x1ffffef, 25), (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26), (0x7ffffe7, 27), (0x7ffffe8, 27),
    (0x7ffffe9, 27), (0x7ffffea, 27), (0x7ffffeb, 27), (0xffffffe, 28), (0x7ffffec, 27), (0x7ffffed, 27),
    (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27), (0x3ffffee, 26), (0x3fffffff, 30),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut v = Vec::new();
        d.decode(block, |n, val| {
            v.push((
                String::from_utf8_lossy(n).into_owned(),
                String::from_utf8_lossy(val).into_owned(),
            ))
        })
        .expect("test input");
        v
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test input"))
            .collect()
    }

    fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
        for &c in s {
            let (code, len) = CODES[usize::from(c)];
            acc = acc << len | u64::from(code);
            bits += u32::from(len);
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | ((1u8 << (8 - bits)) - 1));
        }
        out
    }

    #[test]
    fn rfc7541_c4_requests_with_huffman() {
        let mut d = Decoder::default();
        let first = decode_all(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"));
        assert_eq!(
            first,
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert_eq!(d.size, 57);
        let second = decode_all(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf"));
        assert_eq!(second[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(second[4], ("cache-control".into(), "no-cache".into()));
        assert_eq!(d.size, 110);
    }

    #[test]
    fn every_symbol_round_trips_through_the_huffman_code() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(
            huffman_decode(&huffman_encode(&all)).expect("test input"),
            all
        );
        for s in [
            &b"application/grpc"[..],
            b"/runtime.v1.RuntimeService/Version",
            b"9999999u",
            b"",
        ] {
            assert_eq!(huffman_decode(&huffman_encode(s)).expect("test input"), s);
        }
        // Padding of 8 bits or padding that is not all ones is refused.
        assert_eq!(huffman_decode(&[0xff]), Err(Error::BadHuffman));
        let mut bad = huffman_encode(b"a");
        *bad.last_mut().expect("test input") &= 0xfe;
        assert_eq!(huffman_decode(&bad), Err(Error::BadHuffman));
    }

    /// Bit by bit over the canonical tables: the plain decoder the fast
    /// one must agree with.
    fn reference_decode(b: &[u8]) -> Result<Vec<u8>, Error> {
        let h = &HUFFMAN;
        let (mut out, mut code, mut len) = (Vec::new(), 0u32, 0usize);
        for &byte in b {
            for bit in (0..8).rev() {
                code = code << 1 | u32::from(byte >> bit & 1);
                len += 1;
                if len > 30 {
                    return Err(Error::BadHuffman);
                }
                let i = code.wrapping_sub(h.first[len]);
                if code >= h.first[len] && i < h.count[len] {
                    let sym = h.symbols[h.offset[len] + i as usize];
                    if sym == 256 {
                        return Err(Error::BadHuffman);
                    }
                    out.push(sym as u8);
                    (code, len) = (0, 0);
                }
            }
        }
        if len > 7 || code != (1 << len) - 1 {
            return Err(Error::BadHuffman);
        }
        Ok(out)
    }

    #[test]
    fn the_fast_huffman_decoder_agrees_with_the_bitwise_one() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (rnd() % 24) as usize;
            // Valid encodings of random text, and random bytes.
            let text: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            let enc = huffman_encode(&text);
            assert_eq!(huffman_decode(&enc), Ok(text));
            let junk: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            assert_eq!(huffman_decode(&junk), reference_decode(&junk), "{junk:?}");
        }
    }

    #[test]
    fn eviction_and_size_updates_keep_indices_in_step() {
        let mut d = Decoder::default();
        // Literal with indexing, new name: "k1: v1" (32 + 4 = 36 bytes).
        let lit = |n: &str, v: &str| {
            let mut b = vec![0x40, n.len() as u8];
            b.extend_from_slice(n.as_bytes());
            b.push(v.len() as u8);
            b.extend_from_slice(v.as_bytes());
            b
        };
        // A table of 80 bytes holds two such entries.
        let mut block = vec![0x3f, 0x31]; // size update to 80 (31 + 49)
        block.extend(lit("k1", "v1"));
        block.extend(lit("k2", "v2"));
        block.extend(lit("k3", "v3"));
        decode_all(&mut d, &block);
        assert_eq!(d.max, 80);
        assert_eq!(d.table.len(), 2);
        // Index 62 is the newest, 63 the one before; k1 was evicted.
        let got = decode_all(&mut d, &[0xbe, 0xbf]);
        assert_eq!(
            got,
            [("k3".into(), "v3".into()), ("k2".into(), "v2".into())]
        );
        assert_eq!(d.decode(&[0xc0], |_, _| {}), Err(Error::BadIndex(64)));
        // Size 0 empties the table.
        decode_all(&mut d, &[0x20]);
        assert!(d.table.is_empty());
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        let mut d = Decoder::default();
        for b in [
            &[0x80][..],
            &[0x41],
            &[0x41, 0x85, 0xff],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            &[0x00, 0x03, b'a'],
        ] {
            assert!(d.decode(b, |_, _| {}).is_err(), "{b:?}");
        }
        d.limit = 100;
        assert_eq!(
            d.decode(&[0x3f, 0xe1, 0x1f], |_, _| {}),
            Err(Error::TableSizeAboveLimit)
        );
    }
}
