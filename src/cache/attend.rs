//! Attention calls and `observe`.
//!
//! Owns: batch validation for decode attention, the page selection actually handed to the kernel
//! (the caller's selection minus cold and evicted pages), the synchronous read of cold pages (they
//! are imported into a transient storage of the same device and attended there; the two partial
//! results merge exactly, see [`crate::attention::Attention::merge_disjoint`]), the finiteness
//! guarantee of results, what reading spilled pages cost each call ([`Attention::disk`]), queued
//! device steps (`attend_device_async` / `finish_device`), and `observe`, which folds a step's
//! page masses into `PageMeta` (and refuses a result without page results).
//! Must never: mutate the cache in `attend` (it is `&self`, callable from several threads), or
//! return non-finite attention from finite input.

use super::{KvCache, PageRef, PageTable, SeqId, Tier};
use crate::attention::{Attention, PageSelection};
use crate::backend::{
    AttendInput, BackendStorage, DeviceBuffers, DeviceRotation, PageResults, Scratch,
};
use crate::error::{Error, Result};

use super::append::Rows;

impl KvCache {
    fn batch_tables(&self, layer: usize, seqs: &[SeqId]) -> Result<Vec<&PageTable>> {
        self.check_layer(layer)?;
        let mut tables = Vec::with_capacity(seqs.len().min(self.seqs.len()));
        for (i, s) in seqs.iter().enumerate() {
            if seqs[..i].contains(s) {
                return Err(Error::DuplicateSequence(s.0));
            }
            tables.push(&self.seq_layer(*s, layer)?.table);
        }
        Ok(tables)
    }

    /// Decode attention in `layer` for a batch: `queries` is `[seqs.len(), num_q_heads, head_dim]`,
    /// one query token per sequence, attending to every stored (not evicted) token of that sequence.
    pub fn attend(&self, layer: usize, seqs: &[SeqId], queries: &[f32]) -> Result<Attention> {
        self.attend_with(
            &mut Scratch::default(),
            layer,
            seqs,
            Rows::F32(queries),
            None,
        )
    }

    /// [`KvCache::attend`] over a page selection (per sequence and kv head; see
    /// [`PageSelection`]): exactly the selected pages are attended.
    pub fn attend_select(
        &self,
        layer: usize,
        seqs: &[SeqId],
        queries: &[f32],
        selection: &PageSelection,
    ) -> Result<Attention> {
        self.attend_with(
            &mut Scratch::default(),
            layer,
            seqs,
            Rows::F32(queries),
            Some(selection),
        )
    }

    /// The general decode attention call: a caller-owned reusable `scratch`, f32 / f16 / bf16
    /// queries, and an optional page selection. Cold pages are read synchronously.
    pub fn attend_with(
        &self,
        scratch: &mut Scratch,
        layer: usize,
        seqs: &[SeqId],
        queries: Rows,
        selection: Option<&PageSelection>,
    ) -> Result<Attention> {
        let tables = self.batch_tables(layer, seqs)?;
        let n = self.count_rows("queries", queries.len(), self.cfg.num_q_heads)?;
        if n != seqs.len() {
            return Err(Error::shape(
                "queries",
                format!("{} rows (one per sequence)", seqs.len()),
                format!("{n} rows"),
            ));
        }
        self.check_values("queries", queries, false)?;
        // Next-pages heuristic: the next layer's spilled pages are read while this one computes.
        if layer + 1 < self.cfg.num_layers {
            let _ = self.prefetch(layer + 1, seqs, None);
        }
        let mut q = queries.to_f32();
        if self.cfg.rotation.keys() {
            self.rotator.forward(layer, q.to_mut());
        }
        let mut att = self
            .in_pool(|| self.attend_tables(scratch, layer, seqs, &tables, &q, selection, None))?;
        if self.cfg.rotation.values() {
            self.rotator.inverse(layer, &mut att.output);
        }
        if !att.is_finite() {
            return Err(Error::Overflow(
                "scores overflow f32 for these queries and keys".into(),
            ));
        }
        Ok(att)
    }

    /// [`KvCache::attend`] with queries and output in accelerator memory (see [`DeviceBuffers`]).
    /// Only accelerator backends support it; the CPU backend returns [`Error::Unsupported`].
    pub fn attend_device(
        &self,
        layer: usize,
        seqs: &[SeqId],
        bufs: DeviceBuffers,
    ) -> Result<Attention> {
        self.attend_device_with(&mut Scratch::default(), layer, seqs, &bufs, None)
    }

    /// [`KvCache::attend_device`] with a reusable scratch and an optional page selection. Cold
    /// pages are not supported here (their step would need the queries on the host): bring them
    /// back with [`KvCache::from_cold`] first, or leave them out of the selection.
    pub fn attend_device_with(
        &self,
        scratch: &mut Scratch,
        layer: usize,
        seqs: &[SeqId],
        bufs: &DeviceBuffers,
        selection: Option<&PageSelection>,
    ) -> Result<Attention> {
        let tables = self.batch_tables(layer, seqs)?;
        let device = Some((bufs, self.device_rotation(layer)));
        self.in_pool(|| self.attend_tables(scratch, layer, seqs, &tables, &[], selection, device))
    }

    /// [`KvCache::attend_device_with`] without waiting for the step: the decode (and, when the
    /// scratch wants page results, the page-mass fold) is queued on the buffers' stream and the
    /// call returns without a host synchronisation; the output appears in the caller's buffer when
    /// the stream gets there. Everything the cache later does on the device (appends, demotions,
    /// frees) is ordered after the step. [`KvCache::finish_device`] with the same scratch and layer
    /// returns the statistics; a step that is never finished costs nothing more, and a later call
    /// with the scratch replaces it. The device buffers (and the stream) must stay valid until the
    /// stream has run the step. Selected cold pages are refused before anything is queued.
    pub fn attend_device_async(
        &self,
        scratch: &mut Scratch,
        layer: usize,
        seqs: &[SeqId],
        bufs: &DeviceBuffers,
        selection: Option<&PageSelection>,
    ) -> Result<()> {
        let tables = self.batch_tables(layer, seqs)?;
        let n_pages: Vec<usize> = tables.iter().map(|t| t.pages().len()).collect();
        if let Some(sel) = selection {
            sel.validate(&n_pages, self.cfg.num_kv_heads)?;
        }
        let on_dev = self.device_only(&tables, selection)?;
        let input = AttendInput {
            tables: &tables,
            queries: &[],
            selection: on_dev.as_ref().or(selection),
            rotation: self.device_rotation(layer),
        };
        self.in_pool(|| self.layers[layer].attend_device_async(scratch, &input, bufs))
    }

    /// Waits for the step [`KvCache::attend_device_async`] left pending on `scratch` in `layer`
    /// and returns its result (statistics, and page results if the scratch wants them; `output`
    /// empty). [`Error::Stale`] when nothing is pending there.
    pub fn finish_device(&self, scratch: &mut Scratch, layer: usize) -> Result<Attention> {
        self.check_layer(layer)?;
        self.layers[layer].finish_device(scratch)
    }

    /// The rotation a device applies to `layer`'s queries (and output) for a rotated cache.
    fn device_rotation(&self, layer: usize) -> Option<DeviceRotation<'_>> {
        self.cfg.rotation.keys().then(|| DeviceRotation {
            signs: self.rotator.signs(layer),
            norm: self.rotator.norm(),
            values: self.cfg.rotation.values(),
        })
    }

    /// The selection of device pages for a call that cannot read cold pages: `None` when no table
    /// holds a cold or evicted page (the caller's selection stands), else the caller's selection
    /// (default: all) without evicted pages; selected cold pages are an error.
    fn device_only(
        &self,
        tables: &[&PageTable],
        selection: Option<&PageSelection>,
    ) -> Result<Option<PageSelection>> {
        let kvh = self.cfg.num_kv_heads;
        let off = |e: &super::PageEntry| matches!(e.tier, Tier::Cold | Tier::Evicted);
        if !tables.iter().any(|t| t.pages().iter().any(off)) {
            return Ok(None);
        }
        let n_pages: Vec<usize> = tables.iter().map(|t| t.pages().len()).collect();
        let mut on_dev = selection
            .cloned()
            .unwrap_or_else(|| PageSelection::all(&n_pages, kvh));
        for (i, t) in tables.iter().enumerate() {
            for (p, e) in t.pages().iter().enumerate() {
                if e.tier == Tier::Cold
                    && (0..kvh).any(|kv| on_dev.pages(i, kv).binary_search(&(p as u32)).is_ok())
                {
                    return Err(Error::Unsupported(
                        "attend_device over cold pages: bring them back with from_cold first",
                    ));
                }
                if off(e) {
                    on_dev.remove(i, p as u32);
                }
            }
        }
        Ok(Some(on_dev))
    }

    #[allow(clippy::too_many_arguments)]
    fn attend_tables(
        &self,
        scratch: &mut Scratch,
        layer: usize,
        seqs: &[SeqId],
        tables: &[&PageTable],
        queries: &[f32],
        selection: Option<&PageSelection>,
        device: Option<(&DeviceBuffers, Option<DeviceRotation>)>,
    ) -> Result<Attention> {
        let rotation = device.and_then(|(_, r)| r);
        let device = device.map(|(b, _)| b);
        let kvh = self.cfg.num_kv_heads;
        let n_pages: Vec<usize> = tables.iter().map(|t| t.pages().len()).collect();
        if let Some(sel) = selection {
            sel.validate(&n_pages, kvh)?;
        }
        let off_device = |t: &PageTable| {
            t.pages()
                .iter()
                .any(|p| matches!(p.tier, Tier::Cold | Tier::Evicted))
        };
        let storage = &self.layers[layer];
        if !tables.iter().any(|t| off_device(t)) {
            let input = AttendInput {
                tables,
                queries,
                selection,
                rotation,
            };
            return match device {
                Some(b) => storage.attend_device(scratch, &input, b),
                None => storage.attend(scratch, &input),
            };
        }
        // Split the selection: device pages go to the layer's storage, cold pages to a transient
        // storage; evicted pages to neither.
        let mut on_dev = selection
            .cloned()
            .unwrap_or_else(|| PageSelection::all(&n_pages, kvh));
        let mut cold_sel = PageSelection::none(tables.len(), kvh);
        let mut any_cold = false;
        for (i, t) in tables.iter().enumerate() {
            let mut cold_pages = Vec::new();
            for (p, e) in t.pages().iter().enumerate() {
                match e.tier {
                    Tier::Cold => cold_pages.push(p as u32),
                    Tier::Evicted => {}
                    _ => continue,
                }
                on_dev.remove(i, p as u32);
            }
            if !cold_pages.is_empty() {
                for kv in 0..kvh {
                    let wanted: Vec<u32> = match selection {
                        Some(s) => cold_pages
                            .iter()
                            .copied()
                            .filter(|p| s.pages(i, kv).binary_search(p).is_ok())
                            .collect(),
                        None => cold_pages.clone(),
                    };
                    any_cold |= !wanted.is_empty();
                    cold_sel.set(i, kv, wanted)?;
                }
            }
        }
        let input = AttendInput {
            tables,
            queries,
            selection: Some(&on_dev),
            rotation,
        };
        // Merging with the cold part needs the per-page lse: asked for here, dropped after.
        let what = scratch.page_results();
        let merge = if any_cold && what.masses() {
            PageResults::All
        } else {
            what
        };
        scratch.set_page_results(merge);
        let r = match device {
            Some(b) => storage.attend_device(scratch, &input, b),
            None => storage.attend(scratch, &input),
        };
        scratch.set_page_results(what);
        let mut att = r?;
        if any_cold {
            if device.is_some() {
                return Err(Error::Unsupported(
                    "attend_device over cold pages: bring them back with from_cold first",
                ));
            }
            let cold = self.attend_cold(layer, seqs, tables, queries, &cold_sel, merge)?;
            att.merge_disjoint(&cold);
            att.keep_page_results(what);
        }
        Ok(att)
    }

    /// Attention over the selected cold pages: imported into a transient storage of this cache's
    /// device for this step only, then freed with it (`what`: its per-page results).
    fn attend_cold(
        &self,
        layer: usize,
        seqs: &[SeqId],
        tables: &[&PageTable],
        queries: &[f32],
        sel: &PageSelection,
        what: PageResults,
    ) -> Result<Attention> {
        let mut tmp = self.device.storage(&self.cfg, layer)?;
        let kvh = self.cfg.num_kv_heads;
        let mut staged = Vec::with_capacity(tables.len());
        let mut disk = crate::cold::DiskStep::default();
        for (i, t) in tables.iter().enumerate() {
            let mut pages = t.pages().to_vec();
            for (p, e) in pages.iter_mut().enumerate() {
                if e.tier != Tier::Cold
                    || !(0..kvh).any(|kv| sel.pages(i, kv).binary_search(&(p as u32)).is_ok())
                {
                    continue;
                }
                let r = PageRef {
                    seq: seqs[i],
                    layer,
                    page: p,
                };
                let bytes = self.cold_bytes_counted(r, e, &mut disk)?;
                e.slot = tmp.import_page(&bytes)?;
                e.tier = bytes.tier;
            }
            staged.push(PageTable::from_pages(pages));
        }
        let refs: Vec<&PageTable> = staged.iter().collect();
        let input = AttendInput {
            tables: &refs,
            queries,
            selection: Some(sel),
            rotation: None,
        };
        let mut scratch = Scratch::default();
        scratch.set_page_results(what);
        let mut att = tmp.attend(&mut scratch, &input)?;
        att.disk = disk;
        Ok(att)
    }

    /// Folds one step's attention (`att`, from `attend*` in `layer` over `seqs`, with the cache
    /// unchanged since) into each page's [`super::PageMeta`]: per kv head mass with the config's
    /// decay, and the step at which the page was last attended. Returns [`Error::Stale`] when the
    /// result does not match the cache (a page was added since, wrong layer or batch).
    pub fn observe(&mut self, layer: usize, seqs: &[SeqId], att: &Attention) -> Result<()> {
        let (qh, kvh) = (self.cfg.num_q_heads, self.cfg.num_kv_heads);
        let tables = self.batch_tables(layer, seqs)?;
        if !att.has_page_results() {
            return Err(Error::Stale(
                "the result has no per-page results (it came from a Scratch without page results)"
                    .into(),
            ));
        }
        if att.kv_mass.len() != seqs.len()
            || att.num_q_heads != qh
            || att.num_kv_heads != kvh
            || att.heads.len() != seqs.len() * qh
        {
            return Err(Error::Stale(format!(
                "result for {} sequences x {} q heads, batch of {} x {qh}",
                att.kv_mass.len(),
                att.num_q_heads,
                seqs.len()
            )));
        }
        for (i, t) in tables.iter().enumerate() {
            let lse_ok = !att.has_page_lse() || att.page_lse[i].len() == t.pages().len() * qh;
            if att.kv_mass[i].len() != t.pages().len() * kvh || !lse_ok {
                return Err(Error::Stale(format!(
                    "sequence {} has {} pages in layer {layer}, the result {}",
                    seqs[i],
                    t.pages().len(),
                    att.kv_mass[i].len() / kvh.max(1)
                )));
            }
        }
        let decay = self.cfg.mass_decay;
        for (i, &s) in seqs.iter().enumerate() {
            let mass = att.kv_page_mass(i);
            let sl = self.seq_layer_mut(s, layer)?;
            let step = sl.steps;
            for (p, m) in sl.meta.iter_mut().enumerate() {
                let mut attended = false;
                m.last_mass = 0.0;
                for kv in 0..kvh {
                    m.mass[kv] = decay * m.mass[kv] + mass[p * kvh + kv];
                    m.last_mass += mass[p * kvh + kv];
                    attended |= att.attended(i, p, kv);
                }
                if attended {
                    m.last_attended = Some(step);
                }
            }
            sl.steps += 1;
        }
        Ok(())
    }
}
