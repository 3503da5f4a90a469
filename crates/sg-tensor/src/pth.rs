//! PyTorch checkpoints (`torch.save` since 1.6: a zip archive of a pickle and raw storages), read in
//! pure Rust. The pickle is run on a small virtual machine that understands the opcodes `torch.save`
//! emits; tensors are rebuilt from their storages (any float dtype, offsets and strides included);
//! entries that are not tensors (an argparse `Namespace`, epochs, optimiser settings) are kept as
//! plain values and skipped by [`Checkpoint::state_dict`]. Every failure names the file and what is
//! wrong; nothing panics on a corrupt file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::{Result, TensorError};

fn bad(path: &Path, msg: impl Into<String>) -> TensorError {
    TensorError::Format { path: path.display().to_string(), msg: msg.into() }
}

// ---------------------------------------------------------------- zip

struct Entry {
    offset: u64,
    size: u64,
}

trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// A zip archive of stored (uncompressed) entries, read on demand.
struct Zip {
    path: PathBuf,
    file: Box<dyn ReadSeek>,
    entries: HashMap<String, Entry>,
}

fn u16le(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32le(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}
fn u64le(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

impl Zip {
    fn open(path: &Path) -> Result<Self> {
        let io = |e: std::io::Error| TensorError::Io { path: path.display().to_string(), msg: e.to_string() };
        let file = File::open(path).map_err(io)?;
        Self::new(Box::new(file), path)
    }

    fn new(mut file: Box<dyn ReadSeek>, path: &Path) -> Result<Self> {
        let io = |e: std::io::Error| TensorError::Io { path: path.display().to_string(), msg: e.to_string() };
        let len = file.seek(SeekFrom::End(0)).map_err(io)?;
        // The end-of-central-directory record is within the last 64 KiB + 22 bytes.
        let tail_len = len.min(65_557 + 20);
        let mut tail = vec![0u8; tail_len as usize];
        file.seek(SeekFrom::Start(len - tail_len)).map_err(io)?;
        file.read_exact(&mut tail).map_err(io)?;
        let eocd = (0..tail.len().saturating_sub(21))
            .rev()
            .find(|&i| u32le(&tail, i) == 0x0605_4b50)
            .ok_or_else(|| bad(path, "is not a zip archive (a PyTorch checkpoint since torch 1.6 is one)"))?;
        let mut count = u16le(&tail, eocd + 10) as u64;
        let mut cd_size = u32le(&tail, eocd + 12) as u64;
        let mut cd_offset = u32le(&tail, eocd + 16) as u64;
        if count == 0xFFFF || cd_offset == 0xFFFF_FFFF || cd_size == 0xFFFF_FFFF {
            // Zip64: the locator sits right before the classic record.
            let loc = eocd.checked_sub(20).filter(|&l| u32le(&tail, l) == 0x0706_4b50);
            let loc = loc.ok_or_else(|| bad(path, "zip64 archive without its locator"))?;
            let z64 = u64le(&tail, loc + 8);
            let mut rec = [0u8; 56];
            file.seek(SeekFrom::Start(z64)).map_err(io)?;
            file.read_exact(&mut rec).map_err(|_| bad(path, "zip64 end record lies outside the file"))?;
            if u32le(&rec, 0) != 0x0606_4b50 {
                return Err(bad(path, "corrupt zip64 end record"));
            }
            count = u64le(&rec, 32);
            cd_size = u64le(&rec, 40);
            cd_offset = u64le(&rec, 48);
        }
        if cd_offset.checked_add(cd_size).is_none_or(|e| e > len) || cd_size > 1 << 32 {
            return Err(bad(path, "central directory lies outside the file (truncated?)"));
        }
        let mut cd = vec![0u8; cd_size as usize];
        file.seek(SeekFrom::Start(cd_offset)).map_err(io)?;
        file.read_exact(&mut cd).map_err(|_| bad(path, "central directory is truncated"))?;
        let mut entries = HashMap::new();
        let mut i = 0usize;
        for _ in 0..count {
            if i + 46 > cd.len() || u32le(&cd, i) != 0x0201_4b50 {
                return Err(bad(path, "corrupt central directory"));
            }
            let method = u16le(&cd, i + 10);
            let mut csize = u32le(&cd, i + 20) as u64;
            let mut usize_ = u32le(&cd, i + 24) as u64;
            let (nlen, xlen, clen) =
                (u16le(&cd, i + 28) as usize, u16le(&cd, i + 30) as usize, u16le(&cd, i + 32) as usize);
            let mut local = u32le(&cd, i + 42) as u64;
            let end = i + 46 + nlen + xlen + clen;
            if end > cd.len() {
                return Err(bad(path, "corrupt central directory entry"));
            }
            let name = String::from_utf8_lossy(&cd[i + 46..i + 46 + nlen]).into_owned();
            // Zip64 extra field: the sizes and offset that overflowed, in this order.
            let mut x = i + 46 + nlen;
            while x + 4 <= i + 46 + nlen + xlen {
                let (id, sz) = (u16le(&cd, x), u16le(&cd, x + 2) as usize);
                if id == 1 {
                    let mut p = x + 4;
                    for field in [&mut usize_, &mut csize, &mut local] {
                        if *field == 0xFFFF_FFFF && p + 8 <= x + 4 + sz {
                            *field = u64le(&cd, p);
                            p += 8;
                        }
                    }
                }
                x += 4 + sz;
            }
            if method != 0 {
                return Err(bad(
                    path,
                    format!("entry `{name}` is compressed (method {method}); torch.save stores entries"),
                ));
            }
            if csize != usize_ {
                return Err(bad(path, format!("entry `{name}` has inconsistent sizes")));
            }
            // The data starts after the local header, whose name and extra lengths may differ.
            let mut lh = [0u8; 30];
            file.seek(SeekFrom::Start(local)).map_err(io)?;
            file.read_exact(&mut lh).map_err(|_| bad(path, format!("entry `{name}` lies outside the file")))?;
            if u32le(&lh, 0) != 0x0403_4b50 {
                return Err(bad(path, format!("entry `{name}` has no local header")));
            }
            let data = local.saturating_add(30 + u16le(&lh, 26) as u64 + u16le(&lh, 28) as u64);
            if data.checked_add(csize).is_none_or(|e| e > len) {
                return Err(bad(path, format!("entry `{name}` is truncated")));
            }
            entries.insert(name, Entry { offset: data, size: csize });
            i = end;
        }
        Ok(Zip { path: path.to_path_buf(), file, entries })
    }

    fn read(&mut self, name: &str) -> Result<Vec<u8>> {
        let e = self.entries.get(name).ok_or_else(|| bad(&self.path, format!("has no entry `{name}`")))?;
        let mut buf = vec![0u8; e.size as usize];
        let io = |e: std::io::Error| TensorError::Io { path: self.path.display().to_string(), msg: e.to_string() };
        self.file.seek(SeekFrom::Start(e.offset)).map_err(io)?;
        self.file.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }
}

// ---------------------------------------------------------------- pickle

/// A value of the unpickled object graph.
#[derive(Clone, Debug, PartialEq)]
pub enum PyValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<PyValue>),
    List(Vec<PyValue>),
    Dict(Vec<(PyValue, PyValue)>),
    /// A class or function named by `module.name`.
    Global(String, String),
    /// An object built from a class we do not model (its constructor arguments and state).
    Object {
        class: (String, String),
        args: Vec<PyValue>,
        state: Option<Box<PyValue>>,
    },
    /// A storage reference: dtype name (`FloatStorage`, ...), archive key, element count.
    Storage {
        kind: String,
        key: String,
        numel: usize,
    },
    /// A tensor view of a storage.
    Tensor {
        storage: Box<PyValue>,
        offset: usize,
        size: Vec<usize>,
        stride: Vec<usize>,
    },
}

impl PyValue {
    fn as_usize(&self) -> Option<usize> {
        match self {
            PyValue::Int(v) if *v >= 0 => Some(*v as usize),
            _ => None,
        }
    }

    fn usize_list(&self) -> Option<Vec<usize>> {
        match self {
            PyValue::Tuple(v) | PyValue::List(v) => v.iter().map(|x| x.as_usize()).collect(),
            _ => None,
        }
    }

    /// The entry `key` of a dict.
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        match self {
            PyValue::Dict(items) => {
                items.iter().find(|(k, _)| matches!(k, PyValue::Str(s) if s == key)).map(|(_, v)| v)
            }
            PyValue::Object { state: Some(s), .. } => s.get(key),
            _ => None,
        }
    }
}

/// Limits that keep a hostile pickle from exhausting memory: values on the stack and in lists,
/// and values copied out of the memo (each copy is a deep clone).
const MAX_DEPTH_ITEMS: usize = 1 << 22;
const MAX_CLONED_NODES: usize = 1 << 24;

/// Nodes of a value (for the clone budget).
fn weight(v: &PyValue) -> usize {
    match v {
        PyValue::Tuple(x) | PyValue::List(x) => 1 + x.iter().map(weight).sum::<usize>(),
        PyValue::Dict(x) => 1 + x.iter().map(|(k, v)| weight(k) + weight(v)).sum::<usize>(),
        PyValue::Object { args, state, .. } => {
            1 + args.iter().map(weight).sum::<usize>() + state.as_deref().map_or(0, weight)
        }
        PyValue::Tensor { storage, .. } => 1 + weight(storage),
        PyValue::Str(s) => 1 + s.len() / 64,
        PyValue::Bytes(b) => 1 + b.len() / 64,
        _ => 1,
    }
}

/// Runs a pickle held in memory (the checkpoint's `data.pkl`); `name` labels errors.
pub fn parse_pickle(data: &[u8], name: &str) -> Result<PyValue> {
    unpickle(data, Path::new(name))
}

/// Runs a pickle; `persistent` resolves `BINPERSID` ids (torch's storages).
fn unpickle(data: &[u8], path: &Path) -> Result<PyValue> {
    let err = |pos: usize, msg: &str| bad(path, format!("data.pkl at byte {pos}: {msg}"));
    let mut stack: Vec<PyValue> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u64, PyValue> = HashMap::new();
    let mut i = 0usize;
    let mut cloned = 0usize;
    macro_rules! take {
        ($n:expr) => {{
            let n: usize = $n;
            if n > data.len() - i {
                return Err(err(i, "ends in the middle of an instruction (truncated?)"));
            }
            let s = &data[i..i + n];
            i += n;
            s
        }};
    }
    macro_rules! pop {
        () => {
            stack.pop().ok_or_else(|| err(i, "stack underflow"))?
        };
    }
    macro_rules! pop_mark {
        () => {{
            let m = marks.pop().ok_or_else(|| err(i, "no mark"))?;
            if m > stack.len() {
                return Err(err(i, "mark beyond the stack"));
            }
            stack.split_off(m)
        }};
    }
    loop {
        let pos = i;
        let op = take!(1)[0];
        match op {
            0x80 => {
                take!(1); // PROTO
            }
            0x95 => {
                take!(8); // FRAME
            }
            b'.' => return stack.pop().ok_or_else(|| err(pos, "empty stack at STOP")),
            b'(' => marks.push(stack.len()),
            b'}' => stack.push(PyValue::Dict(vec![])),
            b']' => stack.push(PyValue::List(vec![])),
            b')' => stack.push(PyValue::Tuple(vec![])),
            b'N' => stack.push(PyValue::None),
            0x88 => stack.push(PyValue::Bool(true)),
            0x89 => stack.push(PyValue::Bool(false)),
            b'K' => stack.push(PyValue::Int(take!(1)[0] as i64)),
            b'M' => {
                let b = take!(2);
                stack.push(PyValue::Int(u16le(b, 0) as i64))
            }
            b'J' => {
                let b = take!(4);
                stack.push(PyValue::Int(i32::from_le_bytes(b.try_into().unwrap()) as i64))
            }
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = take!(1)[0] as usize;
                let b = take!(n);
                if n > 8 {
                    return Err(err(pos, "integer wider than 64 bits"));
                }
                let mut v: i64 = 0;
                for (k, &byte) in b.iter().enumerate() {
                    v |= (byte as i64) << (8 * k);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(PyValue::Int(v))
            }
            b'G' => {
                let b = take!(8);
                stack.push(PyValue::Float(f64::from_be_bytes(b.try_into().unwrap())))
            }
            b'X' | 0x8c | 0x8d | b'T' | b'U' | b'B' | b'C' | 0x8e => {
                let n = match op {
                    0x8c | b'U' | b'C' => take!(1)[0] as usize,
                    0x8d | 0x8e => u64le(take!(8), 0) as usize,
                    _ => u32le(take!(4), 0) as usize,
                };
                let b = take!(n).to_vec();
                stack.push(match op {
                    b'X' | 0x8c | 0x8d => {
                        PyValue::Str(String::from_utf8(b).map_err(|_| err(pos, "invalid UTF-8 string"))?)
                    }
                    // Protocol 0-2 byte strings (BINSTRING) are text in practice.
                    b'T' | b'U' => PyValue::Str(String::from_utf8_lossy(&b).into_owned()),
                    _ => PyValue::Bytes(b),
                })
            }
            b't' => {
                let items = pop_mark!();
                stack.push(PyValue::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(err(pos, "stack underflow"));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(PyValue::Tuple(items))
            }
            b'l' => {
                let items = pop_mark!();
                stack.push(PyValue::List(items))
            }
            b'd' => {
                let items = pop_mark!();
                if items.len() % 2 != 0 {
                    return Err(err(pos, "odd number of dict items"));
                }
                let mut it = items.into_iter();
                let mut d = vec![];
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                stack.push(PyValue::Dict(d))
            }
            b'a' | b'e' => {
                let items = if op == b'a' { vec![pop!()] } else { pop_mark!() };
                match stack.last_mut() {
                    Some(PyValue::List(l)) => {
                        if l.len() + items.len() > MAX_DEPTH_ITEMS {
                            return Err(err(pos, "list too large"));
                        }
                        l.extend(items)
                    }
                    _ => return Err(err(pos, "APPEND to a non-list")),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop!();
                    let k = pop!();
                    vec![k, v]
                } else {
                    pop_mark!()
                };
                if items.len() % 2 != 0 {
                    return Err(err(pos, "odd number of dict items"));
                }
                let target = match stack.last_mut() {
                    Some(PyValue::Dict(d)) => d,
                    Some(PyValue::Object { state, .. }) => {
                        // An OrderedDict built by REDUCE: its items land in its state.
                        match state.get_or_insert_with(|| Box::new(PyValue::Dict(vec![]))).as_mut() {
                            PyValue::Dict(d) => d,
                            _ => return Err(err(pos, "SETITEM on an object with a non-dict state")),
                        }
                    }
                    _ => return Err(err(pos, "SETITEM on a non-dict")),
                };
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    target.push((k, v));
                }
            }
            0x8f => stack.push(PyValue::List(vec![])), // EMPTY_SET, kept as a list
            0x90 => {
                let items = pop_mark!();
                if let Some(PyValue::List(l)) = stack.last_mut() {
                    l.extend(items)
                }
            }
            0x91 => {
                let items = pop_mark!();
                stack.push(PyValue::List(items))
            }
            b'0' => {
                pop!();
            }
            b'1' => {
                let _ = pop_mark!();
            }
            b'2' => {
                let v = stack.last().cloned().ok_or_else(|| err(pos, "DUP of an empty stack"))?;
                cloned += weight(&v);
                if cloned > MAX_CLONED_NODES {
                    return Err(err(pos, "copies values beyond any checkpoint's size"));
                }
                stack.push(v)
            }
            b'q' | b'r' | 0x94 => {
                let key = match op {
                    b'q' => take!(1)[0] as u64,
                    b'r' => u32le(take!(4), 0) as u64,
                    _ => memo.len() as u64,
                };
                let v = stack.last().cloned().ok_or_else(|| err(pos, "PUT of an empty stack"))?;
                cloned += weight(&v);
                if cloned > MAX_CLONED_NODES {
                    return Err(err(pos, "copies values beyond any checkpoint's size"));
                }
                memo.insert(key, v);
            }
            b'h' | b'j' => {
                let key = if op == b'h' { take!(1)[0] as u64 } else { u32le(take!(4), 0) as u64 };
                let v = memo.get(&key).cloned().ok_or_else(|| err(pos, "GET of an unknown memo key"))?;
                cloned += weight(&v);
                if cloned > MAX_CLONED_NODES {
                    return Err(err(pos, "copies values beyond any checkpoint's size"));
                }
                stack.push(v)
            }
            b'c' => {
                // GLOBAL: "module\nname\n".
                let rest = &data[i..];
                let nl1 = rest.iter().position(|&c| c == b'\n').ok_or_else(|| err(pos, "bad GLOBAL"))?;
                let nl2 = rest[nl1 + 1..].iter().position(|&c| c == b'\n').ok_or_else(|| err(pos, "bad GLOBAL"))?;
                let module = String::from_utf8_lossy(&rest[..nl1]).into_owned();
                let name = String::from_utf8_lossy(&rest[nl1 + 1..nl1 + 1 + nl2]).into_owned();
                i += nl1 + nl2 + 2;
                stack.push(PyValue::Global(module, name))
            }
            0x93 => {
                let name = pop!();
                let module = pop!();
                match (module, name) {
                    (PyValue::Str(m), PyValue::Str(n)) => stack.push(PyValue::Global(m, n)),
                    _ => return Err(err(pos, "STACK_GLOBAL needs two strings")),
                }
            }
            b'Q' => {
                // BINPERSID: torch's ('storage', storage_type, key, location, numel).
                let pid = pop!();
                let parts = match pid {
                    PyValue::Tuple(p) => p,
                    _ => return Err(err(pos, "persistent id is not a tuple")),
                };
                match parts.as_slice() {
                    [PyValue::Str(tag), kind, PyValue::Str(key), _, numel, ..] if tag == "storage" => {
                        let kind = match kind {
                            PyValue::Global(_, n) => n.clone(),
                            other => return Err(err(pos, &format!("unknown storage type {other:?}"))),
                        };
                        let numel = numel.as_usize().ok_or_else(|| err(pos, "bad storage size"))?;
                        stack.push(PyValue::Storage { kind, key: key.clone(), numel })
                    }
                    _ => return Err(err(pos, "unsupported persistent id")),
                }
            }
            b'R' | 0x81 => {
                let args = pop!();
                let callable = pop!();
                let args = match args {
                    PyValue::Tuple(a) => a,
                    _ => return Err(err(pos, "call arguments are not a tuple")),
                };
                stack.push(call(callable, args).map_err(|m| err(pos, &m))?)
            }
            0x92 => {
                // NEWOBJ_EX: cls, args, kwargs.
                let _kwargs = pop!();
                let args = pop!();
                let cls = pop!();
                let args = match args {
                    PyValue::Tuple(a) => a,
                    _ => vec![],
                };
                stack.push(call(cls, args).map_err(|m| err(pos, &m))?)
            }
            b'b' => {
                let st = pop!();
                match stack.last_mut() {
                    Some(PyValue::Object { state, .. }) => *state = Some(Box::new(st)),
                    // BUILD on tensors sets hooks/metadata we do not need.
                    Some(_) => {}
                    None => return Err(err(pos, "BUILD on an empty stack")),
                }
            }
            other => return Err(err(pos, &format!("unsupported pickle opcode 0x{other:02x}"))),
        }
        if stack.len() > MAX_DEPTH_ITEMS {
            return Err(err(pos, "object graph too large"));
        }
    }
}

/// Calls a global: the tensor rebuilders become tensors, everything else an opaque object.
fn call(callable: PyValue, args: Vec<PyValue>) -> std::result::Result<PyValue, String> {
    let (module, name) = match &callable {
        PyValue::Global(m, n) => (m.as_str(), n.as_str()),
        other => return Err(format!("call of a non-global {other:?}")),
    };
    match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let storage = args.first().cloned().ok_or("tensor without storage")?;
            let offset = args.get(1).and_then(|v| v.as_usize()).ok_or("bad storage offset")?;
            let size = args.get(2).and_then(|v| v.usize_list()).ok_or("bad tensor size")?;
            let stride = args.get(3).and_then(|v| v.usize_list()).ok_or("bad tensor stride")?;
            if size.len() != stride.len() {
                return Err("size and stride of different ranks".into());
            }
            Ok(PyValue::Tensor { storage: Box::new(storage), offset, size, stride })
        }
        // nn.Parameter(tensor, requires_grad, hooks): the tensor itself.
        ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
            args.into_iter().next().ok_or_else(|| "parameter without tensor".into())
        }
        ("collections", "OrderedDict") => Ok(PyValue::Dict(vec![])),
        _ => Ok(PyValue::Object { class: (module.to_string(), name.to_string()), args, state: None }),
    }
}

// ---------------------------------------------------------------- checkpoint

/// A PyTorch checkpoint opened for reading.
pub struct Checkpoint {
    zip: Zip,
    prefix: String,
    /// The unpickled object (usually a dict: `model`, `optimizer`, `epoch`, `args`, ...).
    pub root: PyValue,
}

/// A tensor read from a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct PthTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Checkpoint {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_zip(Zip::open(path)?, path)
    }

    /// A checkpoint held in memory (`name` labels errors).
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<Self> {
        let path = Path::new(name);
        Self::from_zip(Zip::new(Box::new(std::io::Cursor::new(bytes)), path)?, path)
    }

    fn from_zip(mut zip: Zip, path: &Path) -> Result<Self> {
        let pkl = zip
            .entries
            .keys()
            .find(|k| k.ends_with("data.pkl"))
            .cloned()
            .ok_or_else(|| bad(path, "has no data.pkl: not a torch.save checkpoint"))?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let data = zip.read(&pkl)?;
        let root = unpickle(&data, path)?;
        Ok(Checkpoint { zip, prefix, root })
    }

    /// The state dict: the `model` entry (or `state_dict`), else the root itself.
    fn state(&self) -> &PyValue {
        self.root.get("model").or_else(|| self.root.get("state_dict")).unwrap_or(&self.root)
    }

    /// Every tensor of the state dict as f32 (contiguous, row-major), and the names of entries that
    /// are not tensors (skipped).
    pub fn state_dict(&mut self) -> Result<(Vec<PthTensor>, Vec<String>)> {
        let items = match self.state() {
            PyValue::Dict(items) => items.clone(),
            _ => return Err(bad(&self.zip.path, "its model entry is not a dict of tensors")),
        };
        let (mut tensors, mut skipped) = (vec![], vec![]);
        for (k, v) in items {
            let name = match k {
                PyValue::Str(s) => s,
                other => format!("{other:?}"),
            };
            match v {
                PyValue::Tensor { storage, offset, size, stride } => {
                    let data = self.materialise(&name, &storage, offset, &size, &stride)?;
                    tensors.push(PthTensor { name, shape: size, data });
                }
                _ => skipped.push(name),
            }
        }
        Ok((tensors, skipped))
    }

    fn materialise(
        &mut self,
        name: &str,
        storage: &PyValue,
        offset: usize,
        size: &[usize],
        stride: &[usize],
    ) -> Result<Vec<f32>> {
        let path = self.zip.path.clone();
        let (kind, key, numel) = match storage {
            PyValue::Storage { kind, key, numel } => (kind.as_str(), key.as_str(), *numel),
            _ => return Err(bad(&path, format!("tensor `{name}` has no storage"))),
        };
        let elem = match kind {
            "FloatStorage" => 4,
            "DoubleStorage" => 8,
            "HalfStorage" | "BFloat16Storage" => 2,
            other => return Err(bad(&path, format!("tensor `{name}` is stored as {other}, not floating point"))),
        };
        let bytes = self.zip.read(&format!("{}data/{key}", self.prefix))?;
        if numel.checked_mul(elem).is_none_or(|b| bytes.len() < b) {
            return Err(bad(&path, format!("storage {key} of `{name}` is truncated")));
        }
        let at = |i: usize| -> f32 {
            let b = &bytes[i * elem..(i + 1) * elem];
            match kind {
                "FloatStorage" => f32::from_le_bytes(b.try_into().unwrap()),
                "DoubleStorage" => f64::from_le_bytes(b.try_into().unwrap()) as f32,
                "HalfStorage" => f16::from_le_bytes([b[0], b[1]]).to_f32(),
                _ => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            }
        };
        let n = size.iter().try_fold(1usize, |a, &s| a.checked_mul(s));
        // The furthest element addressed must lie inside the storage.
        let last = size
            .iter()
            .zip(stride)
            .try_fold(offset, |a, (&s, &st)| a.checked_add(s.saturating_sub(1).checked_mul(st)?));
        let (n, last) = match (n, last) {
            (Some(n), Some(l)) => (n, l),
            _ => return Err(bad(&path, format!("tensor `{name}` has an impossible size {size:?}"))),
        };
        if n > 0 && last >= numel {
            return Err(bad(&path, format!("tensor `{name}` reaches past its storage")));
        }
        // Broadcast (stride-0) views can address few elements many times; a state dict has none
        // larger than this, and a hostile one must not allocate terabytes.
        if n > numel.max(1).saturating_mul(64) {
            return Err(bad(&path, format!("tensor `{name}` of {n} elements over a storage of {numel}")));
        }
        let mut out = Vec::with_capacity(n);
        let mut idx = vec![0usize; size.len()];
        for _ in 0..n {
            out.push(at(offset + idx.iter().zip(stride).map(|(a, b)| a * b).sum::<usize>()));
            for ax in (0..size.len()).rev() {
                idx[ax] += 1;
                if idx[ax] < size[ax] {
                    break;
                }
                idx[ax] = 0;
            }
        }
        Ok(out)
    }
}

/// Renames to this project's keys: a `module.` prefix (DistributedDataParallel) is dropped, and a
/// fused `attn.qkv` weight or bias is split into the `attn.q`, `attn.k`, `attn.v` the model uses.
pub fn normalise_names(tensors: Vec<PthTensor>) -> Vec<PthTensor> {
    let all_module = !tensors.is_empty() && tensors.iter().all(|t| t.name.starts_with("module."));
    let mut out = Vec::with_capacity(tensors.len());
    for mut t in tensors {
        if all_module {
            t.name = t.name["module.".len()..].to_string();
        }
        let split = ["attn.qkv.weight", "attn.qkv.bias"].iter().find(|s| t.name.ends_with(*s)).copied();
        match split {
            Some(suffix) if !t.shape.is_empty() && t.shape[0] % 3 == 0 => {
                let base = &t.name[..t.name.len() - suffix.len()];
                let kind = if suffix.ends_with("weight") { "weight" } else { "bias" };
                let rows = t.shape[0] / 3;
                let per = t.data.len() / 3;
                for (j, part) in ["q", "k", "v"].iter().enumerate() {
                    let mut shape = t.shape.clone();
                    shape[0] = rows;
                    out.push(PthTensor {
                        name: format!("{base}attn.{part}.{kind}"),
                        shape,
                        data: t.data[j * per..(j + 1) * per].to_vec(),
                    });
                }
            }
            _ => out.push(t),
        }
    }
    out
}
