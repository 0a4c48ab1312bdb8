//! Source locations from DWARF, through `addr2line`.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use addr2line::Context;
use gimli::{EndianArcSlice, RunTimeEndian};
use object::{Object, ObjectSection};

use super::{
    result_layout::{Field, TypeShape, Variant, VariantPart},
    DiscoveryError,
};

type Reader = EndianArcSlice<RunTimeEndian>;

/// Answers "which source file and line is this function in".
/// The context is behind a lock: addr2line parses units lazily and is not
/// `Sync`; lookups after discovery are rare (error stack traces).
pub struct SourceIndex {
    context: Mutex<Context<Reader>>,
    /// The distinct `DW_AT_producer`s of the compile units (GCC records its
    /// command-line switches there by default).
    producers: Vec<String>,
}

impl fmt::Debug for SourceIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SourceIndex")
    }
}

impl SourceIndex {
    /// Loads the DWARF sections of `file` (decompressing them if needed).
    pub fn load(file: &object::File<'_>) -> Result<Self, DiscoveryError> {
        let endian = RunTimeEndian::Little;
        let load_section = |id: gimli::SectionId| -> Result<Reader, gimli::Error> {
            let data = file
                .section_by_name(id.name())
                .and_then(|section| section.uncompressed_data().ok())
                .unwrap_or(Cow::Borrowed(&[]));
            Ok(EndianArcSlice::new(Arc::from(&*data), endian))
        };
        let dwarf = gimli::Dwarf::load(load_section).map_err(DiscoveryError::Dwarf)?;
        let producers = producers(&dwarf);
        let context = Context::from_dwarf(dwarf).map_err(DiscoveryError::Dwarf)?;
        Ok(Self {
            context: Mutex::new(context),
            producers,
        })
    }

    /// Whether some compile unit's producer names `switch` (e.g.
    /// `-fnon-call-exceptions`), as far as the compiler recorded it.
    pub fn compiled_with(&self, switch: &str) -> bool {
        self.producers
            .iter()
            .any(|producer| producer.split_whitespace().any(|word| word == switch))
    }

    /// The file and line of the code at `address`, as written in the function
    /// that contains it (not in a function inlined there). Relative paths are
    /// already joined to the compile unit's directory by `addr2line`.
    pub fn location(&self, address: u64) -> Option<(PathBuf, Option<u32>)> {
        let context = self
            .context
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut frames = context.find_frames(address).skip_all_loads().ok()?;
        let mut outermost = None;
        while let Ok(Some(frame)) = frames.next() {
            if let Some(location) = frame.location {
                if let Some(file) = location.file {
                    outermost = Some((PathBuf::from(file), location.line));
                }
            }
        }
        outermost.or_else(|| {
            let location = context.find_location(address).ok()??;
            Some((PathBuf::from(location.file?), location.line))
        })
    }
}

fn producers(dwarf: &gimli::Dwarf<Reader>) -> Vec<String> {
    let mut producers = std::collections::BTreeSet::new();
    let mut headers = dwarf.units();
    while let Ok(Some(header)) = headers.next() {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let mut entries = unit.entries();
        let Ok(Some((_, root))) = entries.next_dfs() else {
            continue;
        };
        let Ok(Some(value)) = root.attr_value(gimli::DW_AT_producer) else {
            continue;
        };
        if let Ok(text) = dwarf.attr_string(&unit, value) {
            use gimli::Reader as _;
            if let Ok(text) = text.to_string_lossy() {
                producers.insert(text.into_owned());
            }
        }
    }
    producers.into_iter().collect()
}

impl SourceIndex {
    /// The return types of the functions whose code starts at `addresses`,
    /// as [`TypeShape`]s (each compile unit is walked once): `Ok(None)` when
    /// DWARF has no such function or it returns nothing, `Err` with what
    /// could not be read.
    pub fn return_types(
        &self,
        addresses: &[u64],
    ) -> HashMap<u64, Result<Option<TypeShape>, String>> {
        let context = self
            .context
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut found = HashMap::new();
        // The units holding the functions, with the addresses wanted in each.
        let mut units: Vec<(Unit<'_>, HashSet<u64>)> = Vec::new();
        for &address in addresses {
            found.insert(address, Ok(None));
            let Some(unit) = context.find_dwarf_and_unit(address).skip_all_loads() else {
                continue;
            };
            let offset = unit.header.offset();
            match units
                .iter_mut()
                .find(|(known, _)| known.header.offset() == offset)
            {
                Some((_, wanted)) => {
                    wanted.insert(address);
                }
                None => units.push((unit, HashSet::from([address]))),
            }
        }
        for (unit, wanted) in units {
            if let Err(error) = return_types_in(unit, &wanted, &mut found) {
                for address in wanted {
                    found.insert(address, Err(error.clone()));
                }
            }
        }
        found
    }
}

/// Walks `unit` once for the subprograms starting at `wanted`.
fn return_types_in(
    unit: Unit<'_>,
    wanted: &HashSet<u64>,
    found: &mut HashMap<u64, Result<Option<TypeShape>, String>>,
) -> Result<(), String> {
    let mut entries = unit.entries();
    while let Some((_, entry)) = entries.next_dfs().map_err(describe)? {
        if entry.tag() != gimli::DW_TAG_subprogram {
            continue;
        }
        let low_pc = match entry.attr_value(gimli::DW_AT_low_pc).map_err(describe)? {
            Some(value) => unit.attr_address(value).map_err(describe)?,
            // A function in pieces: the one of its ranges wanted.
            None if entry
                .attr_value(gimli::DW_AT_ranges)
                .ok()
                .flatten()
                .is_some() =>
            {
                let mut ranges = unit.die_ranges(entry).map_err(describe)?;
                let mut start = None;
                while let Some(range) = ranges.next().map_err(describe)? {
                    if wanted.contains(&range.begin) {
                        start = Some(range.begin);
                        break;
                    }
                }
                start
            }
            None => None,
        };
        let Some(address) = low_pc.filter(|address| wanted.contains(address)) else {
            continue;
        };
        let shape = declared_type(unit, entry.offset(), 0).and_then(|ty| match ty {
            Some(offset) => read_shape(unit, offset, 0).map(Some),
            None => Ok(None),
        });
        found.insert(address, shape);
    }
    Ok(())
}

fn describe(error: gimli::Error) -> String {
    error.to_string()
}

type Unit<'a> = gimli::UnitRef<'a, Reader>;

/// A reference attribute to a DIE of `unit` (references into another unit
/// are not followed).
fn reference(
    unit: Unit<'_>,
    entry: &gimli::DebuggingInformationEntry<'_, '_, Reader>,
    name: gimli::DwAt,
) -> Result<Option<gimli::UnitOffset>, String> {
    match entry.attr_value(name).map_err(describe)? {
        None => Ok(None),
        Some(gimli::AttributeValue::UnitRef(offset)) => Ok(Some(offset)),
        Some(gimli::AttributeValue::DebugInfoRef(offset)) => offset
            .to_unit_offset(&unit.header)
            .map(Some)
            .ok_or_else(|| "a type described in another compile unit".to_owned()),
        Some(_) => Err(format!("an unexpected form of {name}")),
    }
}

/// The `DW_AT_type` of a function's DIE, or of the declaration it completes.
fn declared_type(
    unit: Unit<'_>,
    offset: gimli::UnitOffset,
    hops: usize,
) -> Result<Option<gimli::UnitOffset>, String> {
    let entry = unit.entry(offset).map_err(describe)?;
    if let Some(ty) = reference(unit, &entry, gimli::DW_AT_type)? {
        return Ok(Some(ty));
    }
    if hops < 2 {
        for link in [gimli::DW_AT_specification, gimli::DW_AT_abstract_origin] {
            if let Some(origin) = reference(unit, &entry, link)? {
                return declared_type(unit, origin, hops + 1);
            }
        }
    }
    Ok(None)
}

fn unsigned(
    entry: &gimli::DebuggingInformationEntry<'_, '_, Reader>,
    name: gimli::DwAt,
) -> Result<Option<u64>, String> {
    Ok(entry
        .attr_value(name)
        .map_err(describe)?
        .and_then(|value| value.udata_value()))
}

/// Deeper types are read as opaque (their size only).
const MAX_TYPE_DEPTH: usize = 12;

/// Structures larger than this (bytes) are never returned in registers:
/// their members are not read.
const MAX_REGISTER_VALUE: u64 = 16;

fn read_shape(
    unit: Unit<'_>,
    offset: gimli::UnitOffset,
    depth: usize,
) -> Result<TypeShape, String> {
    let entry = unit.entry(offset).map_err(describe)?;
    let size = unsigned(&entry, gimli::DW_AT_byte_size)?;
    let name = match entry.attr_value(gimli::DW_AT_name).map_err(describe)? {
        Some(value) => {
            use gimli::Reader as _;
            unit.attr_string(value)
                .and_then(|s| s.to_string_lossy().map(|s| s.into_owned()))
                .unwrap_or_default()
        }
        None => String::new(),
    };
    let sized = || size.ok_or_else(|| format!("no size for the type {name:?}"));
    let pointer = matches!(
        entry.tag(),
        gimli::DW_TAG_pointer_type
            | gimli::DW_TAG_reference_type
            | gimli::DW_TAG_rvalue_reference_type
    );
    if depth > MAX_TYPE_DEPTH && !pointer {
        // Of unknown size: not a zero-sized field, not a scalar.
        return Ok(TypeShape::Opaque {
            size: size.unwrap_or(u64::MAX),
        });
    }
    Ok(match entry.tag() {
        gimli::DW_TAG_base_type => {
            let float = matches!(
                entry.attr_value(gimli::DW_AT_encoding).map_err(describe)?,
                Some(gimli::AttributeValue::Encoding(
                    gimli::DW_ATE_float | gimli::DW_ATE_complex_float
                ))
            );
            if float {
                TypeShape::Float { size: sized()? }
            } else {
                TypeShape::Int { size: sized()? }
            }
        }
        gimli::DW_TAG_enumeration_type => TypeShape::Int { size: sized()? },
        gimli::DW_TAG_pointer_type
        | gimli::DW_TAG_reference_type
        | gimli::DW_TAG_rvalue_reference_type => TypeShape::Pointer,
        gimli::DW_TAG_typedef | gimli::DW_TAG_const_type | gimli::DW_TAG_volatile_type => {
            match reference(unit, &entry, gimli::DW_AT_type)? {
                Some(inner) => read_shape(unit, inner, depth + 1)?,
                None => TypeShape::Int { size: 0 },
            }
        }
        gimli::DW_TAG_structure_type | gimli::DW_TAG_class_type => {
            let size = sized()?;
            if size > MAX_REGISTER_VALUE {
                // Returned through memory whatever it holds.
                TypeShape::Struct {
                    name,
                    size,
                    fields: Vec::new(),
                    variants: None,
                }
            } else {
                read_struct(unit, offset, name, size, depth)?
            }
        }
        gimli::DW_TAG_union_type | gimli::DW_TAG_array_type => TypeShape::Opaque { size: sized()? },
        tag => return Err(format!("a type of tag {tag}")),
    })
}

/// The members of a structure, and its variant part if it is an enum.
fn read_struct(
    unit: Unit<'_>,
    offset: gimli::UnitOffset,
    name: String,
    size: u64,
    depth: usize,
) -> Result<TypeShape, String> {
    let mut tree = unit.entries_tree(Some(offset)).map_err(describe)?;
    let root = tree.root().map_err(describe)?;
    let mut children = root.children();
    let mut fields = Vec::new();
    let mut variants = None;
    while let Some(child) = children.next().map_err(describe)? {
        let entry = child.entry();
        match entry.tag() {
            gimli::DW_TAG_member => {
                if let Some(field) = read_member(unit, entry, depth)? {
                    fields.push(field);
                }
            }
            gimli::DW_TAG_variant_part => {
                variants = read_variant_part(unit, child, depth)?;
            }
            _ => {}
        }
    }
    Ok(TypeShape::Struct {
        name,
        size,
        fields,
        variants,
    })
}

/// A data member (static members, without a location, are left out).
fn read_member(
    unit: Unit<'_>,
    entry: &gimli::DebuggingInformationEntry<'_, '_, Reader>,
    depth: usize,
) -> Result<Option<Field>, String> {
    let Some(location) = entry
        .attr_value(gimli::DW_AT_data_member_location)
        .map_err(describe)?
    else {
        return Ok(None);
    };
    let offset = location
        .udata_value()
        .ok_or_else(|| "a member whose location is not a constant".to_owned())?;
    let ty = reference(unit, entry, gimli::DW_AT_type)?
        .ok_or_else(|| "a member without a type".to_owned())?;
    Ok(Some(Field {
        offset,
        shape: read_shape(unit, ty, depth + 1)?,
    }))
}

/// The variants of an enum; `None` for one without a discriminant (one
/// inhabited variant: `Result<T, Infallible>`).
fn read_variant_part(
    unit: Unit<'_>,
    node: gimli::EntriesTreeNode<'_, '_, '_, Reader>,
    depth: usize,
) -> Result<Option<VariantPart>, String> {
    let Some(discriminant) = reference(unit, node.entry(), gimli::DW_AT_discr)? else {
        return Ok(None);
    };
    let discriminant = unit.entry(discriminant).map_err(describe)?;
    let discriminant_offset = discriminant
        .attr_value(gimli::DW_AT_data_member_location)
        .map_err(describe)?
        .and_then(|value| value.udata_value())
        .ok_or_else(|| "a discriminant without a constant location".to_owned())?;
    let discriminant_type = reference(unit, &discriminant, gimli::DW_AT_type)?
        .ok_or_else(|| "a discriminant without a type".to_owned())?;
    let discriminant_size = read_shape(unit, discriminant_type, depth + 1)?.size();
    let mut variants = Vec::new();
    let mut children = node.children();
    while let Some(child) = children.next().map_err(describe)? {
        if child.entry().tag() != gimli::DW_TAG_variant {
            continue;
        }
        let value = match child
            .entry()
            .attr_value(gimli::DW_AT_discr_value)
            .map_err(describe)?
        {
            None => None,
            Some(gimli::AttributeValue::Sdata(value)) => Some(value as u64),
            Some(value) => Some(
                value
                    .udata_value()
                    .ok_or_else(|| "a discriminant value that is not a constant".to_owned())?,
            ),
        };
        // The variant's one member: its payload structure, named after it.
        let mut members = child.children();
        let Some(member) = members.next().map_err(describe)? else {
            continue;
        };
        let member = member.entry();
        let name = match member.attr_value(gimli::DW_AT_name).map_err(describe)? {
            Some(value) => {
                use gimli::Reader as _;
                unit.attr_string(value)
                    .and_then(|s| s.to_string_lossy().map(|s| s.into_owned()))
                    .unwrap_or_default()
            }
            None => String::new(),
        };
        let fields = match read_member(unit, member, depth)? {
            Some(Field {
                offset: 0,
                shape: TypeShape::Struct { fields, .. },
            }) => fields,
            _ => return Err(format!("the variant {name} is not a structure at offset 0")),
        };
        variants.push(Variant {
            name,
            value,
            fields,
        });
    }
    Ok(Some(VariantPart {
        discriminant_offset,
        discriminant_size,
        variants,
    }))
}
