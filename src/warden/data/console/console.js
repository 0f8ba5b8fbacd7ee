// Warden console: live decision updates and in-page inclusion-proof checks.
// Served as a static file (the Content-Security-Policy forbids inline script).
// Everything from the server is inserted as text, never as markup.
"use strict";

(function () {
  // -- SHA-256 (FIPS 180-4), so proofs verify without WebCrypto (which needs HTTPS) --
  var K = new Uint32Array([
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);

  function sha256(data) {
    var h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
      0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
    var bitLen = data.length * 8;
    var padded = new Uint8Array(((data.length + 9 + 63) >> 6) << 6);
    padded.set(data);
    padded[data.length] = 0x80;
    var view = new DataView(padded.buffer);
    view.setUint32(padded.length - 8, Math.floor(bitLen / 0x100000000));
    view.setUint32(padded.length - 4, bitLen >>> 0);
    var w = new Uint32Array(64);
    for (var off = 0; off < padded.length; off += 64) {
      for (var i = 0; i < 16; i++) w[i] = view.getUint32(off + i * 4);
      for (i = 16; i < 64; i++) {
        var a = w[i - 15], b = w[i - 2];
        var s0 = ((a >>> 7) | (a << 25)) ^ ((a >>> 18) | (a << 14)) ^ (a >>> 3);
        var s1 = ((b >>> 17) | (b << 15)) ^ ((b >>> 19) | (b << 13)) ^ (b >>> 10);
        w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
      }
      var A = h[0], B = h[1], C = h[2], D = h[3], E = h[4], F = h[5], G = h[6], H = h[7];
      for (i = 0; i < 64; i++) {
        var S1 = ((E >>> 6) | (E << 26)) ^ ((E >>> 11) | (E << 21)) ^ ((E >>> 25) | (E << 7));
        var ch = (E & F) ^ (~E & G);
        var t1 = (H + S1 + ch + K[i] + w[i]) >>> 0;
        var S0 = ((A >>> 2) | (A << 30)) ^ ((A >>> 13) | (A << 19)) ^ ((A >>> 22) | (A << 10));
        var maj = (A & B) ^ (A & C) ^ (B & C);
        var t2 = (S0 + maj) >>> 0;
        H = G; G = F; F = E; E = (D + t1) >>> 0; D = C; C = B; B = A; A = (t1 + t2) >>> 0;
      }
      h[0] += A; h[1] += B; h[2] += C; h[3] += D; h[4] += E; h[5] += F; h[6] += G; h[7] += H;
    }
    var out = new Uint8Array(32);
    var ov = new DataView(out.buffer);
    for (i = 0; i < 8; i++) ov.setUint32(i * 4, h[i]);
    return out;
  }

  function b64(text) {
    var raw = atob(text);
    var out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }

  function concat(parts) {
    var n = 0, i;
    for (i = 0; i < parts.length; i++) n += parts[i].length;
    var out = new Uint8Array(n), at = 0;
    for (i = 0; i < parts.length; i++) { out.set(parts[i], at); at += parts[i].length; }
    return out;
  }

  function equal(a, b) {
    if (a.length !== b.length) return false;
    var d = 0;
    for (var i = 0; i < a.length; i++) d |= a[i] ^ b[i];
    return d === 0;
  }

  function hex(bytes) {
    return Array.prototype.map.call(bytes, function (x) { return ("0" + x.toString(16)).slice(-2); }).join("");
  }

  var ONE = new Uint8Array([1]);

  // RFC 9162 section 2.1.3.2: the root an inclusion proof leads to, or null.
  function rootFromProof(leaf, index, size, proof) {
    if (index >= size) return null;
    var fn = index, sn = size - 1, r = leaf;
    for (var i = 0; i < proof.length; i++) {
      if (sn === 0) return null;
      if ((fn & 1) === 1 || fn === sn) {
        r = sha256(concat([ONE, proof[i], r]));
        if ((fn & 1) === 0) {
          while ((fn & 1) === 0 && fn !== 0) { fn = fn >>> 1; sn = sn >>> 1; }
        }
      } else {
        r = sha256(concat([ONE, r, proof[i]]));
      }
      fn = fn >>> 1; sn = sn >>> 1;
    }
    return sn === 0 ? r : null;
  }

  function setStatus(el, ok, text) {
    el.textContent = text;
    el.className = ok ? "verified" : "failed";
    el.setAttribute("data-verified", ok ? "true" : "false");
  }

  function checkSignature(body, note, vkey) {
    // vkey: <name>+<key hash hex>+<base64(0x01 || Ed25519 public key)>
    var parts = vkey.trim().split("+");
    var sigLine = note.slice(body.length + 1).split("\n").filter(function (l) {
      return l.indexOf("\u2014 " + parts[0] + " ") === 0;
    })[0];
    if (!sigLine || !window.crypto || !window.crypto.subtle) return Promise.resolve(null);
    var blob = b64(sigLine.split(" ").pop());
    if (hex(blob.slice(0, 4)) !== parts[1]) return Promise.resolve(false);
    // Standard base64 may itself hold "+": the key is everything after the second one.
    var key = b64(parts.slice(2).join("+")).slice(1);
    return window.crypto.subtle.importKey("raw", key, { name: "Ed25519" }, false, ["verify"])
      .then(function (k) {
        return window.crypto.subtle.verify({ name: "Ed25519" }, k, blob.slice(4), new TextEncoder().encode(body));
      })
      .catch(function () { return null; });
  }

  function verifyProof(section) {
    var status = document.getElementById("proof-status");
    var detail = document.getElementById("proof-detail");
    fetch(section.getAttribute("data-proof"), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (resp) { return resp.json().then(function (j) { return [resp.ok, j]; }); })
      .then(function (got) {
        var p = got[1];
        if (!got[0]) { setStatus(status, false, "No proof: " + ((p.error && p.error.message) || "refused")); return; }
        var record = b64(p.record_b64);
        var leaf = sha256(concat([new Uint8Array([0]), record]));
        var note = p.checkpoint;
        var cut = note.indexOf("\n\n");
        var body = note.slice(0, cut + 1);
        var lines = body.split("\n");
        var signedSize = parseInt(lines[1], 10);
        var signedRoot = b64(lines[2]);
        var root = rootFromProof(leaf, p.seq, p.tree_size, p.proof.map(b64));
        detail.textContent = "record #" + p.seq + "\nleaf hash " + hex(leaf) +
          "\ntree size " + p.tree_size + "\nroot " + (root ? hex(root) : "none") +
          "\nproof: " + p.proof.length + " hashes\n\ncheckpoint:\n" + note;
        if (!equal(leaf, b64(p.leaf_hash))) { setStatus(status, false, "Failed: the record's bytes do not hash to its leaf"); return; }
        if (!root || signedSize !== p.tree_size || !equal(root, signedRoot)) {
          setStatus(status, false, "Failed: the proof does not lead to the signed checkpoint's root");
          return;
        }
        checkSignature(body, note, p.verifier_key).then(function (sig) {
          if (sig === false) { setStatus(status, false, "Failed: the checkpoint's signature does not verify"); return; }
          var how = sig ? "signature verified in this page" : "signature checked by Warden (this browser cannot check Ed25519)";
          setStatus(status, true, "Verified in this page: record #" + p.seq + " is in the signed tree of " +
            p.tree_size + " records (" + how + ")");
        });
      })
      .catch(function (err) { setStatus(status, false, "Failed: " + err); });
  }

  // -- live decisions --
  function cell(row, text, cls) {
    var td = document.createElement("td");
    if (cls) td.className = cls;
    td.textContent = text == null ? "" : String(text);
    row.appendChild(td);
    return td;
  }

  function buildRow(r) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-seq", String(r.seq));
    cell(tr, (r.time || "").slice(0, 19).replace("T", " "));
    cell(tr, r.agent);
    cell(tr, r.tool);
    var eff = cell(tr, "");
    var span = document.createElement("span");
    span.className = "effect effect-" + String(r.effect || "none").replace(/[^a-z_]/g, "");
    span.textContent = r.effect || "\u2014";
    eff.appendChild(span);
    cell(tr, r.mode);
    cell(tr, r.reason, "reason");
    var link = cell(tr, "");
    var a = document.createElement("a");
    a.href = "/console/decisions/" + encodeURIComponent(String(r.seq));
    a.textContent = r.decision_id || r.id;
    link.appendChild(a);
    return tr;
  }

  // What a row shows: its cells' text and its link, so an unchanged row is left alone.
  function signature(tr) {
    var a = tr.querySelector("a");
    return Array.prototype.map.call(tr.cells, function (c) { return c.textContent; }).join("\u0001") +
      "\u0001" + (a ? a.getAttribute("href") : "");
  }

  // Only rows that changed are replaced: a row that stays keeps its node, so the link
  // a keyboard user is on keeps focus (replacing every row dropped it to <body>).
  function renderRows(tbody, rows) {
    var wanted = {};
    var fresh = rows.map(function (r) { var tr = buildRow(r); wanted[tr.getAttribute("data-seq")] = tr; return tr; });
    var focused = document.activeElement;
    var lostFocus = false;
    Array.prototype.slice.call(tbody.rows).forEach(function (old) {
      var seq = old.getAttribute("data-seq");
      var next = seq !== null ? wanted[seq] : null;
      if (!next || signature(next) !== signature(old)) {
        if (focused && old.contains(focused)) lostFocus = true;
        tbody.removeChild(old);
      }
    });
    // Rows kept are in the same order as in the answer (newest first): new ones go
    // before them, never moving a kept node.
    var at = tbody.firstElementChild;
    fresh.forEach(function (tr) {
      if (at && at.getAttribute("data-seq") === tr.getAttribute("data-seq")) {
        at = at.nextElementSibling;
      } else {
        tbody.insertBefore(tr, at);
      }
    });
    while (at) { var gone = at; at = at.nextElementSibling; tbody.removeChild(gone); }
    if (lostFocus) {
      var table = tbody.closest("table");
      if (table) { table.setAttribute("tabindex", "-1"); table.focus(); }
    }
  }

  function say(status, parts) {
    status.replaceChildren();
    parts.forEach(function (p) {
      if (typeof p === "string") { status.appendChild(document.createTextNode(p)); return; }
      var a = document.createElement("a");
      a.href = p.href;
      a.textContent = p.text;
      status.appendChild(a);
    });
  }

  function stopLive(box, status, resp) {
    box.checked = false;
    if (resp.status === 401) {
      var back = "/console/login?next=" + encodeURIComponent(location.pathname);
      say(status, ["Live updates stopped: you are signed out \u2014 ", { href: back, text: "sign in again" }, "."]);
      return;
    }
    var said = "Live updates stopped: Warden answered " + resp.status;
    resp.json()
      .then(function (j) { return (j && j.error && j.error.message) || ""; })
      .catch(function () { return ""; })
      .then(function (why) {
        say(status, [said + (why ? " (" + why + ")" : "") + ". Tick Live updates to try again."]);
      });
  }

  function live(box) {
    var tbody = document.getElementById("decision-rows");
    var status = document.getElementById("live-status");
    var busy = false;
    box.addEventListener("change", function () { if (box.checked) say(status, []); });
    setInterval(function () {
      if (!box.checked || busy) return;
      busy = true;
      fetch(box.getAttribute("data-feed"), { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (resp) {
          if (resp.ok) return resp.json();
          // Signed out (the session ended) or refused: say so, never freeze silently.
          stopLive(box, status, resp);
          return null;
        })
        .then(function (j) {
          if (j && box.checked) { renderRows(tbody, j.rows); say(status, []); }
        })
        .catch(function () {
          say(status, ["Cannot reach Warden right now; live updates try again every few seconds."]);
        })
        .then(function () { busy = false; });
    }, 3000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var section = document.querySelector("section[data-proof]");
    if (section) verifyProof(section);
    var box = document.getElementById("live");
    if (box) live(box);
  });
})();
