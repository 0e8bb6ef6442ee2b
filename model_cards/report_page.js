/* The explorer of report/index.html (hf_clipsel.report_page): data/manifest.js calls CLIPSEL_MANIFEST, each
   data/<column>-<page>.js calls CLIPSEL_CHUNK; both are loaded by <script> tags, so the page works over file://.
   Every row stays in typed arrays: a filter is one pass over them, a sort one native sort of packed keys. */
(function () {
  "use strict";
  var TYPES = { i8: Int8Array, u8: Uint8Array, i16: Int16Array, u16: Uint16Array, i32: Int32Array,
                u32: Uint32Array, f32: Float32Array };
  var TILES_PER_PAGE = 120;
  var PACKED_INDEX = 2097152; // 2^21: a float32's 32 sortable bits and a row index under 2^21 fit a float64 exactly
  var M = null;
  var columns = {}; // name -> {data: typed array of every row, loaded: pages loaded, waiting: page -> callbacks}
  var state = null;
  var shown = new Uint32Array(0); // positions of the rows that match, in display order
  var refreshes = 0;
  var rowsInOrder = true; // row_id ascends with the position (checked once the ids are loaded)
  var $ = function (id) { return document.getElementById(id); };

  function initialState() {
    return { ratio: 0, cls: "", outcome: "", reason: "", damage: "", disagree: false, duplicate: "",
             duplicateId: "", images: false, sort: "row_id", order: "asc", page: 0 };
  }

  function setStatus(kind, text) {
    var status = $("clipsel-status");
    status.dataset.state = kind;
    status.textContent = text;
  }

  function decode(base64, type) {
    var binary = atob(base64), bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return type === "text" ? JSON.parse(new TextDecoder().decode(bytes)) : new TYPES[type](bytes.buffer);
  }

  window.CLIPSEL_CHUNK = function (name, page, base64) {
    var column = columns[name];
    var values = decode(base64, M.columns[name].type), offset = page * M.page_rows;
    if (Array.isArray(column.data)) values.forEach(function (value, k) { column.data[offset + k] = value; });
    else column.data.set(values, offset);
    column.loaded[page] = 1;
    var callbacks = column.waiting[page] || [];
    delete column.waiting[page];
    callbacks.forEach(function (callback) { callback(); });
  };

  function loadPage(name, page) {
    return new Promise(function (resolve, reject) {
      var column = columns[name];
      if (column.loaded[page]) return resolve();
      if (column.waiting[page]) return column.waiting[page].push(resolve);
      column.waiting[page] = [resolve];
      var script = document.createElement("script");
      script.src = M.data_dir + "/" + M.columns[name].file + "-" + String(page).padStart(5, "0") + ".js";
      script.onerror = function () { reject(new Error("could not load " + script.src + ": is data/ beside the page?")); };
      script.onload = function () { script.remove(); }; // the values are copied out: keep the DOM small
      document.head.appendChild(script);
    });
  }

  function loadColumn(name) {
    var pages = [];
    for (var page = 0; page < M.num_pages; page++) pages.push(loadPage(name, page));
    return Promise.all(pages);
  }

  function col(name) { return columns[name] ? columns[name].data : null; }
  function ratio() { return M.ratios[state.ratio]; }
  function dictionary(name) { return M.columns[name].dictionary; }
  function className(label) { return label >= 0 && label < M.class_names.length ? M.class_names[label] : "(no usable label)"; }
  function fmt(value) { return value !== value ? "n/a" : Math.abs(value) >= 1000 ? value.toFixed(0) : value.toPrecision(4); }
  function option(select, value, text) {
    var element = document.createElement("option");
    element.value = value;
    element.textContent = text;
    select.appendChild(element);
  }
  function reasonText(text) { return text === "" ? "(no reason given)" : text; }

  // ---- filtering and counting ----------------------------------------------------------------------------------
  function codeIn(name, text) { return text === "" ? -1 : dictionary(name).indexOf(text); } // -1: any; missing: none

  function matchingRows() {
    var n = M.num_rows, r = ratio();
    var label = col("label"), kept = col(r.selected), reason = col(r.reason), predicted = col("predicted_label");
    var damage = col("damage"), thumbnail = col("thumbnail"), duplicate = col("duplicate_group");
    var cls = state.cls === "" ? null : Number(state.cls);
    var reasonCode = state.reason === "" ? null : dictionary(r.reason).indexOf(state.reason);
    var damageCode = state.damage === "" || !damage ? null : dictionary("damage").indexOf(state.damage === "none" ? "" : state.damage);
    var duplicateId = state.duplicateId === "" ? null : Number(state.duplicateId);
    var rows = new Uint32Array(n), count = 0;
    for (var i = 0; i < n; i++) {
      if (cls !== null && label[i] !== cls) continue;
      if (state.outcome === "kept" && !kept[i]) continue;
      if (state.outcome === "dropped" && kept[i]) continue;
      if (reasonCode !== null && (kept[i] || reason[i] !== reasonCode)) continue;
      if (damageCode !== null && damage[i] !== damageCode) continue;
      if (state.disagree && !(label[i] >= 0 && predicted[i] >= 0 && label[i] !== predicted[i])) continue;
      if (state.images && !thumbnail[i]) continue;
      if (duplicate) {
        if (state.duplicate === "grouped" && duplicate[i] < 0) continue;
        if (state.duplicate === "alone" && duplicate[i] >= 0) continue;
        if (duplicateId !== null && duplicate[i] !== duplicateId) continue;
      }
      rows[count++] = i;
    }
    return rows.subarray(0, count);
  }

  function countRows(rows) {
    var r = ratio(), label = col("label"), kept = col(r.selected), reason = col(r.reason);
    var classes = M.class_names.length;
    var keptBy = new Uint32Array(classes + 1), droppedBy = new Uint32Array(classes + 1);
    var byReason = new Uint32Array(dictionary(r.reason).length), keptTotal = 0;
    for (var k = 0; k < rows.length; k++) {
      var i = rows[k], c = label[i] + 1;
      if (kept[i]) { keptBy[c]++; keptTotal++; } else { droppedBy[c]++; byReason[reason[i]]++; }
    }
    return { keptBy: keptBy, droppedBy: droppedBy, byReason: byReason, kept: keptTotal };
  }

  function sortRows(rows) {
    var descending = state.order === "desc";
    if (state.sort === "row_id") { // the scores are in row order already, as hf_clipsel writes them
      var ids = col("row_id"), byRow = Uint32Array.from(rows);
      if (!rowsInOrder) byRow.sort(function (a, b) { return ids[a] - ids[b]; });
      return descending ? byRow.reverse() : byRow;
    }
    var values = col(state.sort), bits = new Uint32Array(values.buffer);
    var sortable = function (i) {
      if (values[i] !== values[i]) return 4294967295; // NaN (no reward: a flagged row) last, either way
      var b = bits[i], key = b & 0x80000000 ? ~b >>> 0 : (b | 0x80000000) >>> 0;
      return descending ? Math.min(4294967294, 4294967295 - key) : Math.min(4294967294, key);
    };
    if (M.num_rows <= PACKED_INDEX) { // one native numeric sort: the key's high bits, the row's position low
      var keys = new Float64Array(rows.length);
      for (var k = 0; k < rows.length; k++) keys[k] = sortable(rows[k]) * PACKED_INDEX + rows[k];
      keys.sort();
      var out = new Uint32Array(rows.length);
      for (k = 0; k < rows.length; k++) out[k] = keys[k] % PACKED_INDEX;
      return out;
    }
    return Uint32Array.from(rows).sort(function (a, b) { return sortable(a) - sortable(b) || a - b; });
  }

  // ---- rendering -----------------------------------------------------------------------------------------------
  function thumbnailSrc(i) {
    var row = col("row_id")[i], t = M.thumbnails;
    return t.folder + "/" + Math.floor(row / t.per_folder) + "/" + row + "." + t.format;
  }

  function imageElement(i, why) {
    if (col("thumbnail")[i]) {
      var image = document.createElement("img");
      image.loading = "lazy";
      image.src = thumbnailSrc(i);
      image.alt = "row " + col("row_id")[i];
      return image;
    }
    var empty = document.createElement("div");
    empty.className = "clipsel-noimage";
    empty.textContent = why;
    return empty;
  }

  function noImageReason(i) {
    var flag = dictionary("flag_reason")[col("flag_reason")[i]];
    if (flag && flag.indexOf("decode") >= 0) return "image did not decode";
    return M.thumbnails.count ? "not in the thumbnail sample" : "no thumbnails (source not available)";
  }

  function renderCounts(counts) {
    var r = ratio(), body = $("clipsel-reason-counts").tBodies[0];
    body.textContent = "";
    var addRow = function (table, cells, attributes, active) {
      var tr = table.insertRow();
      cells.forEach(function (cell, index) {
        var td = tr.insertCell();
        td.textContent = cell;
        if (index > 0) td.className = "number";
      });
      Object.keys(attributes).forEach(function (key) { tr.dataset[key] = attributes[key]; });
      if (active) tr.className = "active";
      return tr;
    };
    addRow(body, ["kept", counts.kept.toLocaleString("en-US")], { outcome: "kept", reason: "" }, state.outcome === "kept");
    dictionary(r.reason).forEach(function (text, code) {
      if (text === "" && !counts.byReason[code]) return; // the kept rows' code
      addRow(body, ["dropped: " + reasonText(text), counts.byReason[code].toLocaleString("en-US")],
             { outcome: "dropped", reason: text }, state.reason === text && text !== "");
    });
    var classes = $("clipsel-class-counts").tBodies[0];
    classes.textContent = "";
    for (var c = 0; c <= M.class_names.length; c++) {
      if (c === 0 && !counts.keptBy[0] && !counts.droppedBy[0]) continue; // no row without a usable label
      addRow(classes, [className(c - 1), counts.keptBy[c].toLocaleString("en-US"), counts.droppedBy[c].toLocaleString("en-US")],
             { cls: String(c - 1) }, state.cls === String(c - 1));
    }
  }

  function renderGrid() {
    var grid = $("clipsel-grid"), pages = Math.max(1, Math.ceil(shown.length / TILES_PER_PAGE));
    state.page = Math.min(state.page, pages - 1);
    grid.textContent = "";
    var r = ratio(), kept = col(r.selected), reason = col(r.reason), label = col("label");
    var scores = state.sort !== "row_id" ? col(state.sort) : null;
    var start = state.page * TILES_PER_PAGE, end = Math.min(shown.length, start + TILES_PER_PAGE);
    var fragment = document.createDocumentFragment();
    for (var k = start; k < end; k++) {
      var i = shown[k], figure = document.createElement("figure"), caption = document.createElement("figcaption");
      figure.className = "clipsel-tile " + (kept[i] ? "clipsel-kept" : "clipsel-dropped");
      figure.dataset.rowId = col("row_id")[i];
      figure.dataset.position = i;
      figure.appendChild(imageElement(i, noImageReason(i)));
      var outcome = kept[i] ? "<span class=kept-text>kept</span>"
                            : "<span class=why></span>";
      caption.innerHTML = "<b>row " + col("row_id")[i] + "</b><br><span class=cls></span><br>" + outcome +
                          (scores ? "<br>" + fmt(scores[i]) : "");
      caption.querySelector(".cls").textContent = className(label[i]);
      if (!kept[i]) caption.querySelector(".why").textContent = reasonText(dictionary(r.reason)[reason[i]]);
      figure.appendChild(caption);
      fragment.appendChild(figure);
    }
    grid.appendChild(fragment);
    $("p-info").textContent = shown.length ? "rows " + (start + 1).toLocaleString("en-US") + "-" + end.toLocaleString("en-US") +
      " of " + shown.length.toLocaleString("en-US") + " (page " + (state.page + 1) + " of " + pages + ")" +
      (scores ? "; under each tile: " + state.sort : "") : "no row matches";
    $("p-prev").disabled = state.page === 0;
    $("p-next").disabled = state.page >= pages - 1;
  }

  function refresh(keepPage) {
    var token = ++refreshes;
    setStatus("working", "Filtering " + M.num_rows.toLocaleString("en-US") + " rows…");
    var sortColumn = state.sort !== "row_id" ? loadColumn(state.sort) : Promise.resolve();
    return sortColumn.then(function () {
      if (token !== refreshes) return;
      var rows = matchingRows();
      renderCounts(countRows(rows));
      shown = sortRows(rows);
      if (!keepPage) state.page = 0;
      renderGrid();
      var status = $("clipsel-status");
      status.dataset.matches = shown.length;
      status.dataset.refresh = token; // what a test waits on: this filter's results are on the page
      setStatus("ready", shown.length.toLocaleString("en-US") + " of " + M.num_rows.toLocaleString("en-US") +
                " rows match at ratio " + ratio().name + ".");
    }).catch(function (error) { setStatus("error", String(error.message || error)); });
  }

  // ---- the row's details ---------------------------------------------------------------------------------------
  function openDetail(i) {
    var page = Math.floor(i / M.page_rows);
    var lazy = Object.keys(M.columns).filter(function (name) { return !M.columns[name].core; });
    return Promise.all(lazy.map(function (name) { return loadPage(name, page); })).then(function () { renderDetail(i); });
  }

  function renderDetail(i) {
    var label = col("label")[i], predicted = col("predicted_label")[i];
    $("d-title").textContent = "Row " + col("row_id")[i];
    var image = $("d-image");
    image.textContent = "";
    image.appendChild(imageElement(i, noImageReason(i)));
    var fields = $("d-fields");
    fields.textContent = "";
    var field = function (key, name, value) {
      var tr = fields.insertRow();
      tr.dataset.field = key;
      tr.insertCell().textContent = name;
      tr.insertCell().textContent = value;
    };
    field("row_id", "row id", String(col("row_id")[i]));
    if (col("path")) field("path", "file", col("path")[i] || "(none: the source holds the image's bytes only)");
    var given = col("given_label") ? dictionary("given_label")[col("given_label")[i]] : "";
    field("given_label", "given label", className(label) + (given !== "" && given !== String(label) ? " (as given: " + given + ")" : ""));
    field("predicted_label", "CLIP's class", predicted >= 0 ? className(predicted) : "(none: the row was flagged)");
    field("agrees", "labels agree", label >= 0 && predicted >= 0 ? (label === predicted ? "yes" : "no: a likely label error") : "n/a");
    field("flag_reason", "flagged", dictionary("flag_reason")[col("flag_reason")[i]] || "no");
    if (col("damage")) field("damage", "damage", dictionary("damage")[col("damage")[i]] || "none found");
    if (col("duplicate_group")) field("duplicate_group", "duplicate group", col("duplicate_group")[i] >= 0 ? String(col("duplicate_group")[i]) : "none");
    var ratios = $("d-ratios").tBodies[0];
    ratios.textContent = "";
    M.ratios.forEach(function (r) {
      var tr = ratios.insertRow(), kept = col(r.selected)[i];
      tr.dataset.ratio = r.name;
      [r.name, kept ? "kept" : "dropped", kept ? "" : reasonText(dictionary(r.reason)[col(r.reason)[i]]),
       r.reward ? fmt(col(r.reward)[i]) : "n/a"].forEach(function (text) { tr.insertCell().textContent = text; });
    });
    var scores = $("d-scores").tBodies[0];
    scores.textContent = "";
    M.scores.forEach(function (score) {
      var tr = scores.insertRow();
      tr.dataset.score = score.name;
      [score.name, fmt(col(score.name)[i]), score.meaning, score.range].forEach(function (text, index) {
        var td = tr.insertCell();
        td.textContent = text;
        if (index === 1) td.className = "number";
      });
    });
    $("clipsel-detail").hidden = false;
    $("clipsel-detail").dataset.position = i;
  }

  function positionOfRow(rowId) {
    var ids = col("row_id");
    if (rowId < ids.length && ids[rowId] === rowId) return rowId; // row_id is the position in every run's scores
    for (var i = 0; i < ids.length; i++) if (ids[i] === rowId) return i;
    return -1;
  }

  // ---- controls ------------------------------------------------------------------------------------------------
  function fillControls() {
    M.ratios.forEach(function (r, index) { option($("f-ratio"), index, r.name); });
    option($("f-class"), "", "all classes");
    M.class_names.forEach(function (name, index) { option($("f-class"), index, name); });
    option($("f-class"), "-1", "(no usable label)");
    option($("f-reason"), "", "any");
    var reasons = [];
    M.ratios.forEach(function (r) {
      dictionary(r.reason).forEach(function (text) { if (text !== "" && reasons.indexOf(text) < 0) reasons.push(text); });
    });
    reasons.forEach(function (text) { option($("f-reason"), text, text); });
    option($("f-damage"), "", "any");
    if (M.columns.damage) {
      option($("f-damage"), "none", "none found");
      dictionary("damage").forEach(function (text) { if (text !== "") option($("f-damage"), text, text); });
    }
    option($("f-sort"), "row_id", "row id");
    M.scores.forEach(function (score) { option($("f-sort"), score.name, score.name); });
  }

  function showState() {
    $("f-ratio").value = state.ratio;
    $("f-class").value = state.cls;
    $("f-outcome").value = state.outcome;
    $("f-reason").value = state.reason;
    $("f-damage").value = state.damage;
    $("f-disagree").checked = state.disagree;
    $("f-images").checked = state.images;
    $("f-sort").value = state.sort;
    $("f-order").value = state.order;
    if ($("f-duplicate")) { $("f-duplicate").value = state.duplicate; $("f-duplicate-id").value = state.duplicateId; }
  }

  function readControls() {
    state.ratio = Number($("f-ratio").value);
    state.cls = $("f-class").value;
    state.outcome = $("f-outcome").value;
    state.reason = $("f-reason").value;
    state.damage = $("f-damage").value;
    state.disagree = $("f-disagree").checked;
    state.images = $("f-images").checked;
    state.sort = $("f-sort").value;
    state.order = $("f-order").value;
    if ($("f-duplicate")) { state.duplicate = $("f-duplicate").value; state.duplicateId = $("f-duplicate-id").value; }
    if (state.reason !== "" && state.outcome === "kept") state.outcome = ""; // a reason means dropped
  }

  function filterToClass(name) {
    var index = M.class_names.indexOf(name);
    if (index < 0) return;
    state.cls = String(index);
    showState();
    refresh();
    $("explore").scrollIntoView();
  }

  function wire() {
    $("clipsel-filters").addEventListener("submit", function (event) { event.preventDefault(); });
    $("clipsel-filters").addEventListener("change", function () { readControls(); showState(); refresh(); });
    $("f-reset").addEventListener("click", function () { state = initialState(); showState(); refresh(); });
    $("p-prev").addEventListener("click", function () { state.page -= 1; renderGrid(); });
    $("p-next").addEventListener("click", function () { state.page += 1; renderGrid(); });
    $("clipsel-reason-counts").addEventListener("click", function (event) {
      var tr = event.target.closest("tbody tr");
      if (!tr) return;
      state.outcome = tr.dataset.outcome;
      state.reason = tr.dataset.reason;
      showState();
      refresh();
    });
    $("clipsel-class-counts").addEventListener("click", function (event) {
      var tr = event.target.closest("tbody tr");
      if (!tr) return;
      state.cls = state.cls === tr.dataset.cls ? "" : tr.dataset.cls; // a second click clears it
      showState();
      refresh();
    });
    $("clipsel-grid").addEventListener("click", function (event) {
      var tile = event.target.closest(".clipsel-tile");
      if (tile) openDetail(Number(tile.dataset.position));
    });
    $("d-close").addEventListener("click", function () { $("clipsel-detail").hidden = true; });
    $("clipsel-detail").addEventListener("click", function (event) {
      if (event.target === $("clipsel-detail")) $("clipsel-detail").hidden = true;
    });
    document.addEventListener("keydown", function (event) {
      if (event.key === "Escape") $("clipsel-detail").hidden = true;
    });
    // The rest of the page links here: a class of the per-class table or of the figure's class list filters to
    // it; a tile of a fixed gallery opens the row's details.
    document.querySelectorAll("[data-clipsel-class]").forEach(function (element) {
      element.addEventListener("click", function () { filterToClass(element.dataset.clipselClass); });
    });
    var links = document.getElementById("clipsel-class-links");
    if (links) {
      M.class_names.forEach(function (name) {
        var button = document.createElement("button");
        button.type = "button";
        button.textContent = name;
        button.dataset.clipselClass = name;
        button.addEventListener("click", function () { filterToClass(name); });
        links.appendChild(button);
      });
    }
    document.querySelectorAll(".gallery [data-row-id], #flagged [data-row-id]").forEach(function (element) {
      element.style.cursor = "pointer";
      element.addEventListener("click", function () {
        var position = positionOfRow(Number(element.dataset.rowId));
        if (position >= 0) openDetail(position);
      });
    });
  }

  function start(manifest) {
    M = manifest;
    state = initialState();
    Object.keys(M.columns).forEach(function (name) {
      var type = M.columns[name].type, data = type === "text" ? new Array(M.num_rows) : new TYPES[type](M.num_rows);
      columns[name] = { data: data, loaded: new Uint8Array(M.num_pages), waiting: {} };
    });
    fillControls();
    showState();
    wire();
    var core = Object.keys(M.columns).filter(function (name) { return M.columns[name].core; });
    setStatus("loading", "Loading " + M.num_rows.toLocaleString("en-US") + " rows…");
    Promise.all(core.map(loadColumn)).then(function () {
      var ids = col("row_id");
      for (var i = 1; i < ids.length && rowsInOrder; i++) rowsInOrder = ids[i - 1] < ids[i];
      refresh();
    })
      .catch(function (error) { setStatus("error", String(error.message || error)); });
  }

  window.CLIPSEL_MANIFEST = function (manifest) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", function () { start(manifest); });
    else start(manifest);
  };
})();
