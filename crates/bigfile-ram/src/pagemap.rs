//! `PageMap`: a radix table from 64-bit page offsets to values.
//!
//! Layout. Every table has [`FANOUT`] = 512 slots, so a table of pointers is exactly one 4 KiB OS
//! page (512 × 8 bytes on a 64-bit target), allocated page-aligned. A key is cut into 9-bit
//! digits; level 0 (the leaves) is indexed by the lowest digit. The tree is only as tall as its
//! largest key needs: keys below 2^9 need one level, below 2^18 two, and every `u64` fits in
//! eight. Neighbouring keys share a leaf, so walking a file's blocks in order touches each table
//! once, and a lookup costs one dependent load per level.
//!
//! Leaves hold the values inline as `Option<V>`: for the pointer-sized, niche-carrying values
//! the layer above stores (`NonNull`, `Box`, `NonZeroU64`, …) a leaf is one OS page too.
//!
//! Occupancy counts. Each table needs its number of occupied slots (to be freed the moment it
//! empties) but a count field would push it past one page. Tables are 4096-aligned, so the low
//! 12 bits of every pointer to a table are zero: the count of a table (at most 512) lives in the
//! low bits of the slot that points to it — in its parent, or in `PageMap::root` for the root.
//!
//! Invariants, checked by `check` in the tests:
//! * an inner slot is 0 (empty) or a tagged pointer to a child table whose count is in its tag;
//! * no table is empty: a table whose count drops to 0 is freed and its slot cleared;
//! * the height is minimal: the root is never an inner table whose only child is at slot 0
//!   (that tree would serve the same keys one level lower);
//! * `len` is the number of `Some` values, `tables` the number of live tables.

use core::alloc::Layout;
use core::fmt;
use core::marker::PhantomData;
use core::ops::{Bound, RangeBounds};
use core::ptr;
use std::alloc;

/// log2 of the number of slots per table.
const BITS: u32 = 9;
/// Slots per table: 512 pointers fill one 4 KiB page.
pub const FANOUT: usize = 1 << BITS;
/// Height that covers every `u64` key: ceil(64 / 9).
const MAX_HEIGHT: u32 = u64::BITS.div_ceil(BITS);
/// Alignment of every table; it frees the low 12 bits of table pointers for the count.
const TABLE_ALIGN: usize = 4096;
const TAG_MASK: usize = TABLE_ALIGN - 1;

// The count (0..=FANOUT) must fit under the alignment.
const _: () = assert!(FANOUT < TABLE_ALIGN);

/// A table of child pointers (tagged with the child's count).
type Inner = [*mut u8; FANOUT];
/// A table of values.
type Leaf<V> = [Option<V>; FANOUT];

/// Slot index of `key` at `level` (0 = leaf level).
#[inline]
fn digit(key: u64, level: u32) -> usize {
    // MAX_HEIGHT * BITS = 72 > 64: the top level has only one meaningful bit, and no shift
    // reaches 64 because level < MAX_HEIGHT = 8 means shift <= 63.
    ((key >> (level * BITS)) as usize) & (FANOUT - 1)
}

/// Smallest height whose tree can hold `key`.
#[inline]
fn height_for(key: u64) -> u32 {
    let bits = u64::BITS - key.leading_zeros();
    bits.div_ceil(BITS).max(1)
}

/// Whether a tree of `height` levels can hold `key`.
#[inline]
fn fits(key: u64, height: u32) -> bool {
    height >= MAX_HEIGHT || (height > 0 && key >> (height * BITS) == 0)
}

/// Occupancy count stored in a tagged slot.
#[inline]
fn count(slot: *mut u8) -> usize {
    slot as usize & TAG_MASK
}

/// The table a tagged slot points to. Pointer arithmetic (not integer casts) keeps provenance.
#[inline]
fn untag(slot: *mut u8) -> *mut u8 {
    slot.wrapping_sub(count(slot))
}

fn inner_layout() -> Layout {
    // 4096 bytes, 4096-aligned: both are valid for a Layout.
    Layout::from_size_align(size_of::<Inner>(), TABLE_ALIGN).expect("inner table layout")
}

fn leaf_layout<V>() -> Layout {
    Layout::new::<Leaf<V>>()
        .align_to(TABLE_ALIGN)
        .expect("leaf table layout")
}

/// A map from `u64` keys (page offsets) to `V`, as a radix table of page-sized levels.
///
/// `get`, `insert` and `remove` cost one memory access per level, at most eight levels for
/// keys anywhere in `u64` and one to three for files up to 2^27 pages. Iteration is in
/// ascending key order and skips empty subtrees, so a sparse map iterates in time proportional
/// to its tables, not to its key range.
///
/// ```
/// use bigfile_ram::PageMap;
/// let mut m = PageMap::new();
/// m.insert(7, "seven");
/// m.insert(u64::MAX, "last");
/// assert_eq!(m.get(7), Some(&"seven"));
/// assert_eq!(m.keys().collect::<Vec<_>>(), [7, u64::MAX]);
/// assert_eq!(m.remove(7), Some("seven"));
/// assert_eq!(m.len(), 1);
/// ```
pub struct PageMap<V> {
    /// Tagged pointer to the root table (count in the low bits), or null when the map is empty.
    root: *mut u8,
    /// Levels in the tree: 0 when empty, 1 when the root is a leaf.
    height: u32,
    len: usize,
    tables: usize,
    /// The map owns its values (for drop check and auto traits).
    _owns: PhantomData<Box<V>>,
}

// SAFETY: the map exclusively owns its tables and values, like a `Vec<V>`; the raw pointers
// are never shared outside `&self`/`&mut self` borrows, so sending the map sends only `V`s.
unsafe impl<V: Send> Send for PageMap<V> {}
// SAFETY: `&PageMap` hands out only `&V` (and reads tables without writing them), so sharing
// the map between threads is sharing `&V`, which `V: Sync` permits.
unsafe impl<V: Sync> Sync for PageMap<V> {}

impl<V> Default for PageMap<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> PageMap<V> {
    /// An empty map; allocates nothing until the first insert.
    pub const fn new() -> Self {
        PageMap {
            root: ptr::null_mut(),
            height: 0,
            len: 0,
            tables: 0,
            _owns: PhantomData,
        }
    }

    /// Number of values in the map.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the map holds no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of tables currently allocated (inner and leaf). Exposed for tests that check
    /// tables are freed when they empty.
    #[doc(hidden)]
    pub fn table_count(&self) -> usize {
        self.tables
    }

    /// Current height of the tree (0 when empty). Exposed for tests.
    #[doc(hidden)]
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Pointer to the leaf slot of `key`, or `None` when no leaf covers it.
    fn slot_ptr(&self, key: u64) -> Option<*mut Option<V>> {
        if !fits(key, self.height) {
            return None;
        }
        let mut table = untag(self.root);
        for level in (1..self.height).rev() {
            // SAFETY: `table` is a live inner table (levels above 0 hold `Inner`), and
            // `digit` is < FANOUT.
            let slot = unsafe { (*table.cast::<Inner>())[digit(key, level)] };
            if slot.is_null() {
                return None;
            }
            table = untag(slot);
        }
        // SAFETY: at level 0 `table` is a live leaf table; the index is < FANOUT.
        Some(unsafe { ptr::addr_of_mut!((*table.cast::<Leaf<V>>())[digit(key, 0)]) })
    }

    /// The value at `key`.
    #[inline]
    pub fn get(&self, key: u64) -> Option<&V> {
        // SAFETY: the slot lives as long as `&self` (tables are only freed through `&mut self`).
        self.slot_ptr(key).and_then(|p| unsafe { (*p).as_ref() })
    }

    /// The value at `key`, mutably.
    #[inline]
    pub fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        // SAFETY: as in `get`, and `&mut self` makes the reference unique.
        self.slot_ptr(key).and_then(|p| unsafe { (*p).as_mut() })
    }

    /// Whether `key` has a value.
    #[inline]
    pub fn contains_key(&self, key: u64) -> bool {
        self.get(key).is_some()
    }

    /// Grows the tree until `key` fits: each new root has the old root at slot 0.
    fn grow_for(&mut self, key: u64) {
        if self.height == 0 {
            // Empty map: start directly at the height `key` needs; insert builds the path.
            self.height = height_for(key);
            self.root = if self.height == 1 {
                alloc_leaf::<V>()
            } else {
                alloc_inner()
            };
            self.tables += 1;
            return;
        }
        while !fits(key, self.height) {
            let new_root = alloc_inner();
            // SAFETY: `new_root` is a fresh, zeroed inner table.
            unsafe { (*new_root.cast::<Inner>())[0] = self.root };
            self.root = new_root.wrapping_add(1);
            self.height += 1;
            self.tables += 1;
        }
    }

    /// Stores `value` at `key`, returning the value it replaces.
    pub fn insert(&mut self, key: u64, value: V) -> Option<V> {
        self.grow_for(key);
        // `tagged` points at the slot holding the current table's pointer and count. Only
        // fields other than `root` are touched through `self` while it is in use.
        let mut tagged: *mut *mut u8 = ptr::addr_of_mut!(self.root);
        for level in (1..self.height).rev() {
            // SAFETY: `tagged` points at `self.root` or into a live inner table, and levels
            // above 0 hold inner tables.
            let table = untag(unsafe { *tagged }).cast::<Inner>();
            // SAFETY: `table` is live and the index is < FANOUT.
            let child = unsafe { ptr::addr_of_mut!((*table)[digit(key, level)]) };
            // SAFETY: `child` and `tagged` point at live slots only this call references.
            unsafe {
                if (*child).is_null() {
                    *child = if level == 1 {
                        alloc_leaf::<V>()
                    } else {
                        alloc_inner()
                    };
                    self.tables += 1;
                    *tagged = (*tagged).wrapping_add(1);
                }
            }
            tagged = child;
        }
        // SAFETY: `tagged` holds a live leaf table.
        let leaf = untag(unsafe { *tagged }).cast::<Leaf<V>>();
        // SAFETY: index < FANOUT in a live leaf, uniquely borrowed through `&mut self`.
        let old = unsafe { (*leaf)[digit(key, 0)].replace(value) };
        if old.is_none() {
            // SAFETY: `tagged` points at a live slot.
            unsafe { *tagged = (*tagged).wrapping_add(1) };
            self.len += 1;
        }
        old
    }

    /// Removes and returns the value at `key`; frees every table this leaves empty.
    pub fn remove(&mut self, key: u64) -> Option<V> {
        if !fits(key, self.height) {
            return None;
        }
        // path[l] is the slot pointing at the table of level l.
        let mut path = [ptr::null_mut::<*mut u8>(); MAX_HEIGHT as usize];
        path[self.height as usize - 1] = ptr::addr_of_mut!(self.root);
        for level in (1..self.height).rev() {
            // SAFETY: path[level] is a live slot holding an inner table.
            let table = untag(unsafe { *path[level as usize] }).cast::<Inner>();
            // SAFETY: live table, index < FANOUT.
            let child = unsafe { ptr::addr_of_mut!((*table)[digit(key, level)]) };
            // SAFETY: `child` is a live slot.
            if unsafe { (*child).is_null() } {
                return None;
            }
            path[level as usize - 1] = child;
        }
        // SAFETY: path[0] holds a live leaf.
        let leaf = untag(unsafe { *path[0] }).cast::<Leaf<V>>();
        // SAFETY: index < FANOUT in a live leaf, uniquely borrowed through `&mut self`.
        let old = unsafe { (*leaf)[digit(key, 0)].take() }?;
        self.len -= 1;
        // Decrement counts upwards; a table that empties is freed and its slot cleared, which
        // in turn takes one from its parent.
        for (level, &slot) in path.iter().enumerate().take(self.height as usize) {
            // SAFETY: `slot` is live with a count >= 1: its table held what was removed.
            let s = unsafe {
                *slot = (*slot).wrapping_sub(1);
                *slot
            };
            if count(s) != 0 {
                break;
            }
            // SAFETY: the table holds nothing and is unreachable once its slot is cleared.
            unsafe {
                free_empty_table::<V>(untag(s), level == 0);
                *slot = ptr::null_mut();
            }
            self.tables -= 1;
        }
        if self.root.is_null() {
            self.height = 0;
        } else {
            self.shrink();
        }
        Some(old)
    }

    /// Lowers the tree while the root's only child sits at slot 0.
    fn shrink(&mut self) {
        while self.height > 1 && count(self.root) == 1 {
            let table = untag(self.root).cast::<Inner>();
            // SAFETY: the root of a tree of height > 1 is a live inner table.
            let first = unsafe { (*table)[0] };
            if first.is_null() {
                break;
            }
            // SAFETY: the root's only child moves up, so the old root holds nothing and
            // nothing points at it any more.
            unsafe {
                (*table)[0] = ptr::null_mut();
                free_empty_table::<V>(table.cast(), false);
            }
            self.tables -= 1;
            self.root = first;
            self.height -= 1;
        }
    }

    /// Removes every value and frees every table.
    pub fn clear(&mut self) {
        if !self.root.is_null() {
            let (root, height) = (untag(self.root), self.height);
            // Reset first so a panicking `V::drop` leaves an empty, valid map (leaking the
            // rest) rather than one pointing at freed tables.
            self.root = ptr::null_mut();
            self.height = 0;
            self.len = 0;
            self.tables = 0;
            // SAFETY: the root was live and is now unreachable from `self`.
            unsafe { free_subtree::<V>(root, height - 1) };
        }
    }

    /// Values in ascending key order.
    pub fn iter(&self) -> Range<'_, V> {
        self.range(..)
    }

    /// Keys in ascending order.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter().map(|(k, _)| k)
    }

    /// Values whose keys lie in `range`, in ascending key order. Empty subtrees are skipped
    /// a table at a time.
    pub fn range(&self, range: impl RangeBounds<u64>) -> Range<'_, V> {
        let start = match range.start_bound() {
            Bound::Included(&s) => Some(s),
            Bound::Excluded(&s) => s.checked_add(1),
            Bound::Unbounded => Some(0),
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Some(e),
            Bound::Excluded(&e) => e.checked_sub(1),
            Bound::Unbounded => Some(u64::MAX),
        };
        let next = match (start, end) {
            (Some(s), Some(e)) if s <= e && !self.root.is_null() => Some(s),
            _ => None,
        };
        Range {
            map: self,
            next,
            end: end.unwrap_or(0),
            leaf: ptr::null(),
        }
    }

    /// The first leaf that may hold keys >= `key`, with the first key to look at in it:
    /// `key` itself when `key`'s leaf exists, else the first key of the next existing leaf.
    fn seek_leaf(&self, key: u64) -> Option<(*const Leaf<V>, u64)> {
        if self.root.is_null() || !fits(key, self.height) {
            return None;
        }
        // SAFETY: the root is live; the search only follows live child pointers.
        unsafe { seek_in::<V>(untag(self.root), self.height - 1, key) }
    }
}

fn alloc_inner() -> *mut u8 {
    let layout = inner_layout();
    // SAFETY: the layout has non-zero size; zeroed slots are null pointers (empty).
    let p = unsafe { alloc::alloc_zeroed(layout) };
    if p.is_null() {
        alloc::handle_alloc_error(layout);
    }
    p
}

fn alloc_leaf<V>() -> *mut u8 {
    let layout = leaf_layout::<V>();
    // SAFETY: the layout has non-zero size (`Option<V>` is at least one byte).
    let p = unsafe { alloc::alloc(layout) };
    if p.is_null() {
        alloc::handle_alloc_error(layout);
    }
    let leaf = p.cast::<Option<V>>();
    for i in 0..FANOUT {
        // SAFETY: `p` has room for FANOUT `Option<V>`s, suitably aligned.
        unsafe { leaf.add(i).write(None) };
    }
    p
}

/// Frees a table with no children and no values.
///
/// # Safety
/// `table` is a live table (a leaf when `leaf`) holding nothing, not used afterwards.
unsafe fn free_empty_table<V>(table: *mut u8, leaf: bool) {
    let layout = if leaf {
        leaf_layout::<V>()
    } else {
        inner_layout()
    };
    // SAFETY: allocated with this layout by `alloc_inner`/`alloc_leaf`; an empty leaf holds
    // only `None`s, which need no drop.
    unsafe { alloc::dealloc(table, layout) };
}

/// Drops every value under `table` and frees every table.
///
/// # Safety
/// `table` is a live table of `level`, owned by the caller and not used afterwards.
unsafe fn free_subtree<V>(table: *mut u8, level: u32) {
    if level == 0 {
        // SAFETY: a live leaf: drop its values in place, then free it.
        unsafe {
            ptr::drop_in_place(table.cast::<Leaf<V>>());
            alloc::dealloc(table, leaf_layout::<V>());
        }
        return;
    }
    let inner = table.cast::<Inner>();
    for i in 0..FANOUT {
        // SAFETY: live inner table, index < FANOUT.
        let slot = unsafe { (*inner)[i] };
        if !slot.is_null() {
            // SAFETY: a live child one level down, owned by this table only.
            unsafe { free_subtree::<V>(untag(slot), level - 1) };
        }
    }
    // SAFETY: allocated with `inner_layout` by `alloc_inner`.
    unsafe { alloc::dealloc(table, inner_layout()) };
}

/// Depth-first search under `table` for the first leaf that may hold keys >= `key`.
///
/// # Safety
/// `table` is a live table of `level`.
unsafe fn seek_in<V>(table: *const u8, level: u32, key: u64) -> Option<(*const Leaf<V>, u64)> {
    if level == 0 {
        return Some((table.cast(), key));
    }
    let inner = table.cast::<Inner>();
    let shift = level * BITS;
    let mut key = key;
    for i in digit(key, level)..FANOUT {
        // SAFETY: live table, index < FANOUT.
        let slot = unsafe { (*inner)[i] };
        if !slot.is_null() {
            // SAFETY: a live child one level down.
            if let Some(found) = unsafe { seek_in::<V>(untag(slot), level - 1, key) } {
                return Some(found);
            }
        }
        // The next child's first key: this level's digit becomes i + 1, lower digits 0.
        // At the top level only slots 0 and 1 can be occupied, so the overflow of
        // `(i + 1) << 63` for larger `i` never reaches a live child.
        let low = (1u64 << shift) - 1;
        let digit_bits = (FANOUT as u64 - 1) << shift;
        key = (key & !(low | digit_bits)) | ((i as u64 + 1) << shift);
    }
    None
}

impl<V> Drop for PageMap<V> {
    fn drop(&mut self) {
        self.clear();
    }
}

impl<V: fmt::Debug> fmt::Debug for PageMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V: Clone> Clone for PageMap<V> {
    fn clone(&self) -> Self {
        let mut m = PageMap::new();
        for (k, v) in self {
            m.insert(k, v.clone());
        }
        m
    }
}

impl<V> Extend<(u64, V)> for PageMap<V> {
    fn extend<I: IntoIterator<Item = (u64, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<V> FromIterator<(u64, V)> for PageMap<V> {
    fn from_iter<I: IntoIterator<Item = (u64, V)>>(iter: I) -> Self {
        let mut m = PageMap::new();
        m.extend(iter);
        m
    }
}

impl<'a, V> IntoIterator for &'a PageMap<V> {
    type Item = (u64, &'a V);
    type IntoIter = Range<'a, V>;
    fn into_iter(self) -> Range<'a, V> {
        self.iter()
    }
}

/// Iterator over a key range of a [`PageMap`], ascending. Made by [`PageMap::iter`] and
/// [`PageMap::range`].
pub struct Range<'a, V> {
    map: &'a PageMap<V>,
    /// Next key to look at; `None` once exhausted.
    next: Option<u64>,
    /// Last key of the range (inclusive).
    end: u64,
    /// Leaf covering `next`, when known (null otherwise).
    leaf: *const Leaf<V>,
}

// SAFETY: `Range` only reads through `&'a PageMap<V>`; it is as thread-safe as `&V`.
unsafe impl<V: Sync> Send for Range<'_, V> {}
// SAFETY: as above; `next` takes `&mut self`, so shared access reads nothing mutable.
unsafe impl<V: Sync> Sync for Range<'_, V> {}

impl<V> fmt::Debug for Range<'_, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Range")
            .field("next", &self.next)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl<'a, V> Iterator for Range<'a, V> {
    type Item = (u64, &'a V);

    fn next(&mut self) -> Option<(u64, &'a V)> {
        loop {
            let key = self.next?;
            if self.leaf.is_null() {
                match self.map.seek_leaf(key) {
                    Some((leaf, first)) if first <= self.end && first >= key => {
                        self.leaf = leaf;
                        self.next = Some(first);
                    }
                    _ => {
                        self.next = None;
                        return None;
                    }
                }
            }
            let key = self.next?;
            let leaf = self.leaf;
            let base = key & !(FANOUT as u64 - 1);
            let last = (base | (FANOUT as u64 - 1)).min(self.end);
            for k in key..=last {
                // SAFETY: `leaf` is a live leaf of the map (borrowed for 'a) and the index
                // is < FANOUT.
                if let Some(v) = unsafe { (*leaf)[(k - base) as usize].as_ref() } {
                    self.next = if k == self.end { None } else { Some(k + 1) };
                    if k == last {
                        self.leaf = ptr::null();
                    }
                    return Some((k, v));
                }
            }
            // Nothing left in this leaf: continue at the next leaf, if any remains in range.
            self.leaf = ptr::null();
            self.next = if last == self.end {
                None
            } else {
                Some(last + 1)
            };
        }
    }
}

impl<V> core::iter::FusedIterator for Range<'_, V> {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    impl<V> PageMap<V> {
        /// Walks the tree checking every invariant in the module docs.
        fn check(&self) {
            if self.root.is_null() {
                assert_eq!((self.height, self.len, self.tables), (0, 0, 0));
                return;
            }
            assert!(self.height >= 1 && self.height <= MAX_HEIGHT);
            let (mut values, mut tables) = (0, 0);
            // SAFETY: the root is live.
            unsafe { walk::<V>(self.root, self.height - 1, &mut values, &mut tables) };
            assert_eq!(values, self.len);
            assert_eq!(tables, self.tables);
            if self.height > 1 {
                // SAFETY: the root of a tall tree is a live inner table.
                let root = unsafe { &*untag(self.root).cast::<Inner>() };
                assert!(
                    count(self.root) != 1 || root[0].is_null(),
                    "height is not minimal"
                );
            }
        }
    }

    /// # Safety
    /// `slot` is a tagged pointer to a live table of `level`.
    unsafe fn walk<V>(slot: *mut u8, level: u32, values: &mut usize, tables: &mut usize) {
        *tables += 1;
        let table = untag(slot);
        assert_eq!(table as usize % TABLE_ALIGN, 0);
        let n = if level == 0 {
            // SAFETY: a live leaf.
            let leaf = unsafe { &*table.cast::<Leaf<V>>() };
            leaf.iter().filter(|v| v.is_some()).count()
        } else {
            // SAFETY: a live inner table.
            let inner = unsafe { &*table.cast::<Inner>() };
            let mut n = 0;
            for &s in inner.iter().filter(|s| !s.is_null()) {
                n += 1;
                // SAFETY: a live child.
                unsafe { walk::<V>(s, level - 1, values, tables) };
            }
            n
        };
        assert!(n > 0, "empty table at level {level} not freed");
        assert_eq!(n, count(slot), "stale count at level {level}");
        if level == 0 {
            *values += n;
        }
    }

    /// Tables a minimal tree over `keys` has: at each level, one table per distinct prefix.
    fn expected_tables<'a>(keys: impl Iterator<Item = &'a u64> + Clone) -> usize {
        let Some(h) = keys.clone().map(|&k| height_for(k)).max() else {
            return 0;
        };
        (0..h)
            .map(|level| {
                let shift = (level + 1) * BITS;
                let mut prefixes: Vec<u64> = keys
                    .clone()
                    .map(|&k| k.checked_shr(shift).unwrap_or(0))
                    .collect();
                prefixes.dedup();
                prefixes.len()
            })
            .sum()
    }

    #[test]
    fn empty() {
        let m: PageMap<u32> = PageMap::new();
        assert!(m.is_empty());
        assert_eq!(m.get(0), None);
        assert_eq!(m.get(u64::MAX), None);
        assert_eq!(m.iter().next(), None);
        assert_eq!(m.table_count(), 0);
        m.check();
    }

    #[test]
    fn tables_are_one_page_for_pointer_values() {
        assert_eq!(size_of::<Inner>(), 4096);
        assert_eq!(size_of::<Leaf<ptr::NonNull<u8>>>(), 4096);
        assert_eq!(size_of::<Leaf<Box<u64>>>(), 4096);
    }

    #[test]
    fn grows_and_shrinks() {
        let mut m = PageMap::new();
        m.insert(1, 1);
        assert_eq!((m.height(), m.table_count()), (1, 1));
        m.insert(1 << 9, 2);
        assert_eq!((m.height(), m.table_count()), (2, 3));
        m.insert(u64::MAX, 3);
        assert_eq!(m.height(), MAX_HEIGHT);
        m.check();
        assert_eq!(m.remove(u64::MAX), Some(3));
        assert_eq!((m.height(), m.table_count()), (2, 3));
        assert_eq!(m.remove(1 << 9), Some(2));
        assert_eq!((m.height(), m.table_count()), (1, 1));
        assert_eq!(m.remove(1), Some(1));
        assert_eq!((m.height(), m.table_count()), (0, 0));
        m.check();
    }

    #[test]
    fn high_key_alone_keeps_full_height() {
        let mut m = PageMap::new();
        m.insert(1 << 63, ());
        assert_eq!(m.height(), MAX_HEIGHT);
        assert_eq!(m.table_count(), MAX_HEIGHT as usize);
        assert_eq!(m.keys().collect::<Vec<_>>(), [1 << 63]);
        m.check();
    }

    #[test]
    fn drops_values() {
        use std::rc::Rc;
        let rc = Rc::new(());
        let mut m = PageMap::new();
        for k in [0, 5, 1 << 20, u64::MAX] {
            m.insert(k, rc.clone());
        }
        assert_eq!(Rc::strong_count(&rc), 5);
        m.remove(5);
        assert_eq!(Rc::strong_count(&rc), 4);
        m.clear();
        assert_eq!(Rc::strong_count(&rc), 1);
        m.insert(3, rc.clone());
        drop(m);
        assert_eq!(Rc::strong_count(&rc), 1);
    }

    #[test]
    fn range_bounds() {
        let m: PageMap<u64> = [0, 1, 511, 512, 1000, 1 << 40, u64::MAX - 1, u64::MAX]
            .into_iter()
            .map(|k| (k, k))
            .collect();
        let keys = |r: Range<'_, u64>| r.map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(keys(m.range(1..=512)), [1, 511, 512]);
        assert_eq!(keys(m.range(2..511)), Vec::<u64>::new());
        assert_eq!(
            keys(m.range(513..)),
            [1000, 1 << 40, u64::MAX - 1, u64::MAX]
        );
        assert_eq!(keys(m.range(u64::MAX..)), [u64::MAX]);
        assert_eq!(keys(m.range(..1)), [0]);
        assert_eq!(keys(m.range(..0)), Vec::<u64>::new());
        assert_eq!(
            keys(m.range((Bound::Excluded(u64::MAX), Bound::Unbounded))),
            Vec::<u64>::new()
        );
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = m.range(10..5);
        assert_eq!(keys(reversed), Vec::<u64>::new());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32),
        Remove(u64),
        Get(u64),
        Range(u64, u64),
        Clear,
    }

    /// Keys clustered where the structure has edges: small, around table boundaries, near
    /// 2^64, plus anywhere.
    fn key() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => 0u64..2048,
            2 => (0u32..64, 0u64..4).prop_map(|(b, d)| (1u64 << b).wrapping_add(d).wrapping_sub(2)),
            3 => (0u64..2048).prop_map(|d| u64::MAX - d),
            1 => any::<u64>(),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (key(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            4 => key().prop_map(Op::Remove),
            2 => key().prop_map(Op::Get),
            2 => (key(), key()).prop_map(|(a, b)| Op::Range(a.min(b), a.max(b))),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn matches_btreemap(ops in proptest::collection::vec(op(), 1..200)) {
            let mut m = PageMap::new();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(m.insert(k, v), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(m.remove(k), model.remove(&k)),
                    Op::Get(k) => {
                        prop_assert_eq!(m.get(k), model.get(&k));
                        if let Some(v) = m.get_mut(k) {
                            *v = v.wrapping_add(1);
                            *model.get_mut(&k).unwrap() = *v;
                        }
                    }
                    Op::Range(a, b) => {
                        let got: Vec<_> = m.range(a..=b).collect();
                        let want: Vec<_> = model.range(a..=b).map(|(&k, v)| (k, v)).collect();
                        prop_assert_eq!(got, want);
                        let got: Vec<_> = m.range(a..b).map(|(k, _)| k).collect();
                        let want: Vec<_> = model.range(a..b).map(|(&k, _)| k).collect();
                        prop_assert_eq!(got, want);
                    }
                    Op::Clear => {
                        m.clear();
                        model.clear();
                    }
                }
                prop_assert_eq!(m.len(), model.len());
                prop_assert_eq!(m.is_empty(), model.is_empty());
                prop_assert_eq!(m.table_count(), expected_tables(model.keys()));
            }
            m.check();
            let got: Vec<_> = m.iter().map(|(k, &v)| (k, v)).collect();
            let want: Vec<_> = model.iter().map(|(&k, &v)| (k, v)).collect();
            prop_assert_eq!(got, want);
            // Removing everything frees every table.
            for k in model.keys() {
                prop_assert!(m.remove(*k).is_some());
            }
            prop_assert_eq!(m.table_count(), 0);
            m.check();
        }
    }
}
