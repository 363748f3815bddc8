// branchlens' WebGL scatter (a Streamlit components-v2 component; dashboard/webgl.py packs its data).
//
// Every point is drawn by one WebGL draw call from integer grid coordinates; picking (click, hover) is done
// on the CPU with a grid index, so it does not depend on the GPU (software WebGL picks as fast as a GPU).
// Wheel zooms, drag pans, shift-drag (or the Box tool) draws a box, the Lasso tool draws a free shape;
// a box or lasso goes back to Python as a polygon in grid units (state "selection"), a click as the
// nearest point's branch and position (state "click", with a nonce). Escape or "Clear" drops the selection.

const PICK_PX = 8; // a click or hover takes the nearest point within this many CSS pixels
const MAX_LASSO = 200; // vertices a lasso sends at most (Python tests every point against each edge)
const CLICK_WAIT_MS = 250; // a click waits this long for the second press of a double-click
const CLICKS_KEPT = 32; // the last clicks sent each time (Python applies each nonce once)
const VS = `
attribute vec2 a_q; attribute float a_bin;
uniform vec2 u_scale; uniform vec2 u_shift; uniform float u_size; uniform float u_alpha;
uniform vec4 u_pal[48]; uniform vec4 u_solid;
varying vec4 v_col;
void main() {
  gl_Position = vec4(a_q * u_scale + u_shift, 0.0, 1.0);
  gl_PointSize = u_size;
  vec4 c = u_solid.a > 0.0 ? u_solid : u_pal[int(a_bin + 0.5)];
  v_col = vec4(c.rgb, c.a * u_alpha);
}`;
const FS = `
precision mediump float;
varying vec4 v_col; uniform float u_ring; uniform float u_round;
void main() {
  vec2 d = gl_PointCoord * 2.0 - 1.0; float r = dot(d, d);
  if (u_round > 0.5 && r > 1.0) discard;
  if (u_ring > 0.5 && r < 0.55) discard;
  gl_FragColor = vec4(v_col.rgb * v_col.a, v_col.a);
}`;

function decode(bytes) {
  const buf = bytes.slice().buffer; // a copy starting at offset 0, so typed views are aligned
  const hlen = new DataView(buf).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, hlen)));
  let off = (4 + hlen + 3) & ~3;
  const take = (Type, count) => {
    const a = new Type(buf, off, count);
    off = (off + count * Type.BYTES_PER_ELEMENT + 3) & ~3;
    return a;
  };
  const n = header.n;
  return {
    header,
    branch: take(Int32Array, n),
    position: take(Int32Array, n),
    tok: take(Uint32Array, n), // index into header.vocab, the distinct token texts
    q: take(Uint16Array, 2 * n), // x0, y0, x1, y1, ...
    bin: take(Uint8Array, n),
    chosen: take(Uint32Array, header.n_chosen),
    lineRows: take(Uint32Array, header.n_line_rows),
  };
}

function shader(gl, type, src) {
  const s = gl.createShader(type);
  gl.shaderSource(s, src);
  gl.compileShader(s);
  if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(s));
  return s;
}

function setup(root) {
  const s = { k: 1, tx: 0, ty: 0, mode: "pan", drag: null, data: null, clicks: [], sent: false };
  const bar = document.createElement("div");
  bar.className = "bl-bar";
  const tools = [
    ["pan", "Pan", "Drag to pan, wheel to zoom, click a point to follow its branch"],
    ["box", "Box", "Drag a box to select the tokens inside it (shift-drag does it in any mode)"],
    ["lasso", "Lasso", "Draw around the tokens to select"],
  ];
  const button = (label, title, className, onclick) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.title = title;
    b.setAttribute("aria-label", title);
    b.className = className;
    b.onclick = onclick;
    bar.appendChild(b);
    return b;
  };
  s.buttons = {};
  for (const [mode, label, title] of tools) {
    s.buttons[mode] = button(label, title, "bl-tool" + (mode === s.mode ? " bl-on" : ""), () => {
      s.mode = mode;
      for (const [m, x] of Object.entries(s.buttons)) x.className = "bl-tool" + (m === mode ? " bl-on" : "");
    });
  }
  button("Clear", "Drop the box or lasso (Escape)", "bl-tool bl-clear", () => s.clearSelection());
  button("Fit", "Zoom to show every point (double-click does it too)", "bl-tool", () => {
    s.fitView();
    s.draw();
  });
  const stage = document.createElement("div");
  stage.className = "bl-stage";
  const canvas = document.createElement("canvas");
  const overlay = document.createElement("canvas");
  overlay.className = "bl-overlay";
  overlay.tabIndex = 0;
  overlay.setAttribute("role", "img");
  const tip = document.createElement("div");
  tip.className = "bl-tip";
  stage.append(canvas, overlay, tip);
  root.append(bar, stage);
  s.root = root; s.canvas = canvas; s.overlay = overlay; s.tip = tip; s.stage = stage;

  const gl = canvas.getContext("webgl", { antialias: false, premultipliedAlpha: true, preserveDrawingBuffer: true });
  s.gl = gl;
  if (!gl) {
    stage.textContent = "This browser has no WebGL: choose \"sample branches\" or \"density\" above.";
    return s;
  }
  const prog = gl.createProgram();
  gl.attachShader(prog, shader(gl, gl.VERTEX_SHADER, VS));
  gl.attachShader(prog, shader(gl, gl.FRAGMENT_SHADER, FS));
  gl.linkProgram(prog);
  gl.useProgram(prog);
  s.prog = prog;
  s.loc = {};
  for (const u of ["u_scale", "u_shift", "u_size", "u_alpha", "u_pal", "u_solid", "u_ring", "u_round"])
    s.loc[u] = gl.getUniformLocation(prog, u);
  s.aQ = gl.getAttribLocation(prog, "a_q");
  s.aBin = gl.getAttribLocation(prog, "a_bin");
  s.buf = { q: gl.createBuffer(), bin: gl.createBuffer(), cq: gl.createBuffer(), cbin: gl.createBuffer(), lines: gl.createBuffer() };

  s.dpr = () => window.devicePixelRatio || 1;
  s.size = () => [Math.max(stage.clientWidth, 50), Math.max(stage.clientHeight, 50)];
  s.toScreen = (qx, qy) => [qx * s.k + s.tx, qy * s.k + s.ty];
  s.toGrid = (px, py) => [(px - s.tx) / s.k, (py - s.ty) / s.k];

  s.fitView = () => {
    if (!s.data) return;
    s.touched = false;
    const [w, h] = s.size(), [gx, gy] = s.data.header.grid;
    s.fitted = [w, h];
    s.k = Math.min(w / gx, h / gy) * 0.92;
    s.tx = (w - gx * s.k) / 2;
    s.ty = (h - gy * s.k) / 2;
  };

  s.buildIndex = () => {
    // a counting sort of the points into NX x NY cells of the grid: picking scans the cells near the cursor
    const d = s.data, n = d.header.n, [gx, gy] = d.header.grid;
    const cells = Math.max(1, Math.min(1 << 20, Math.floor(n / 4)));
    const nx = Math.max(1, Math.round(Math.sqrt((cells * gx) / gy))), ny = Math.max(1, Math.round(cells / nx));
    const cw = gx / nx, ch = gy / ny;
    const cell = new Uint32Array(n), start = new Uint32Array(nx * ny + 1);
    for (let i = 0; i < n; i++) {
      const c = Math.min(nx - 1, Math.floor(d.q[2 * i] / cw)) + Math.min(ny - 1, Math.floor(d.q[2 * i + 1] / ch)) * nx;
      cell[i] = c;
      start[c + 1]++;
    }
    for (let c = 0; c < nx * ny; c++) start[c + 1] += start[c];
    const fill = start.slice(0, nx * ny), order = new Uint32Array(n);
    for (let i = 0; i < n; i++) order[fill[cell[i]]++] = i;
    s.index = { nx, ny, cw, ch, start, order };
  };

  s.nearest = (px, py) => {
    if (!s.data || !s.index) return -1;
    const d = s.data, { nx, ny, cw, ch, start, order } = s.index;
    const [gx, gy] = s.toGrid(px, py), r = PICK_PX / s.k;
    const x0 = Math.max(0, Math.floor((gx - r) / cw)), x1 = Math.min(nx - 1, Math.floor((gx + r) / cw));
    const y0 = Math.max(0, Math.floor((gy - r) / ch)), y1 = Math.min(ny - 1, Math.floor((gy + r) / ch));
    let best = -1, bestD = r * r;
    for (let cy = y0; cy <= y1; cy++)
      for (let cx = x0; cx <= x1; cx++) {
        const c = cx + cy * nx;
        for (let j = start[c]; j < start[c + 1]; j++) {
          const i = order[j], dx = d.q[2 * i] - gx, dy = d.q[2 * i + 1] - gy, dd = dx * dx + dy * dy;
          if (dd <= bestD) { bestD = dd; best = i; }
        }
      }
    return best;
  };

  s.upload = () => {
    const d = s.data, h = d.header, n = h.n;
    gl.bindBuffer(gl.ARRAY_BUFFER, s.buf.q);
    gl.bufferData(gl.ARRAY_BUFFER, d.q, gl.STATIC_DRAW);
    gl.bindBuffer(gl.ARRAY_BUFFER, s.buf.bin);
    gl.bufferData(gl.ARRAY_BUFFER, d.bin, gl.STATIC_DRAW);
    const cq = new Uint16Array(2 * h.n_chosen), cbin = new Uint8Array(h.n_chosen);
    d.chosen.forEach((i, j) => { cq[2 * j] = d.q[2 * i]; cq[2 * j + 1] = d.q[2 * i + 1]; cbin[j] = d.bin[i]; });
    gl.bindBuffer(gl.ARRAY_BUFFER, s.buf.cq);
    gl.bufferData(gl.ARRAY_BUFFER, cq, gl.STATIC_DRAW);
    gl.bindBuffer(gl.ARRAY_BUFFER, s.buf.cbin);
    gl.bufferData(gl.ARRAY_BUFFER, cbin, gl.STATIC_DRAW);
    const lq = new Uint16Array(2 * h.n_line_rows);
    d.lineRows.forEach((i, j) => { lq[2 * j] = d.q[2 * i]; lq[2 * j + 1] = d.q[2 * i + 1]; });
    gl.bindBuffer(gl.ARRAY_BUFFER, s.buf.lines);
    gl.bufferData(gl.ARRAY_BUFFER, lq, gl.STATIC_DRAW);
    const pal = new Float32Array(48 * 4);
    h.palette.forEach((c, i) => { if (i < 48) pal.set([c[0] / 255, c[1] / 255, c[2] / 255, 1], 4 * i); });
    gl.uniform4fv(s.loc.u_pal, pal);
    s.nPoints = n;
  };

  s.bind = (qBuf, binBuf) => {
    gl.bindBuffer(gl.ARRAY_BUFFER, qBuf);
    gl.enableVertexAttribArray(s.aQ);
    gl.vertexAttribPointer(s.aQ, 2, gl.UNSIGNED_SHORT, false, 0, 0);
    if (binBuf) {
      gl.bindBuffer(gl.ARRAY_BUFFER, binBuf);
      gl.enableVertexAttribArray(s.aBin);
      gl.vertexAttribPointer(s.aBin, 1, gl.UNSIGNED_BYTE, false, 0, 0);
    } else {
      gl.disableVertexAttribArray(s.aBin);
      gl.vertexAttrib1f(s.aBin, 0);
    }
  };

  s.draw = () => {
    if (!s.data) return;
    const [w, h] = s.size(), r = s.dpr();
    if (canvas.width !== Math.round(w * r) || canvas.height !== Math.round(h * r)) {
      canvas.width = overlay.width = Math.round(w * r);
      canvas.height = overlay.height = Math.round(h * r);
      canvas.style.width = overlay.style.width = w + "px";
      canvas.style.height = overlay.style.height = h + "px";
    }
    gl.viewport(0, 0, canvas.width, canvas.height);
    gl.clearColor(0, 0, 0, 0);
    gl.clear(gl.COLOR_BUFFER_BIT);
    gl.enable(gl.BLEND);
    gl.blendFunc(gl.ONE, gl.ONE_MINUS_SRC_ALPHA);
    // grid -> clip: x_clip = (q k + t) / w * 2 - 1, y_clip = 1 - (q k + t) / h * 2
    gl.uniform2f(s.loc.u_scale, (2 * s.k) / w, (-2 * s.k) / h);
    gl.uniform2f(s.loc.u_shift, (2 * s.tx) / w - 1, 1 - (2 * s.ty) / h);
    const hd = s.data.header, any = hd.n_chosen > 0;
    const pass = (size, alpha, solid, ring, round) => {
      gl.uniform1f(s.loc.u_size, size * r);
      gl.uniform1f(s.loc.u_alpha, alpha);
      gl.uniform4fv(s.loc.u_solid, solid || [0, 0, 0, 0]);
      gl.uniform1f(s.loc.u_ring, ring ? 1 : 0);
      gl.uniform1f(s.loc.u_round, round ? 1 : 0);
    };
    s.bind(s.buf.q, s.buf.bin);
    pass(hd.point_px, any ? 0.16 : 0.82, null, false, true);
    gl.drawArrays(gl.POINTS, 0, s.nPoints);
    if (hd.n_line_rows) {
      s.bind(s.buf.lines, null);
      pass(1, 0.45, [0.08, 0.08, 0.08, 1], false, false); // light: the ringed tokens stay readable
      let at = 0;
      for (const len of hd.lines) { gl.drawArrays(gl.LINE_STRIP, at, len); at += len; }
    }
    if (any) {
      s.bind(s.buf.cq, s.buf.cbin);
      pass(hd.point_px + 1, 1.0, null, false, true);
      gl.drawArrays(gl.POINTS, 0, hd.n_chosen);
      s.bind(s.buf.cq, null);
      pass(hd.point_px + 4, 0.75, [0, 0, 0, 1], true, true);
      gl.drawArrays(gl.POINTS, 0, hd.n_chosen);
    }
    s.drawOverlay();
    stage.dataset.zoom = (s.k / (s.k0 || s.k)).toFixed(3); // how far in from "every point" (tests read it)
  };

  s.drawOverlay = (shape) => {
    const ctx = overlay.getContext("2d"), r = s.dpr();
    ctx.setTransform(r, 0, 0, r, 0, 0);
    ctx.clearRect(0, 0, overlay.width, overlay.height);
    const poly = shape || (s.data && s.data.header.selection) || null;
    if (!poly || poly.length < 2) return;
    const pts = shape ? poly : poly.map(([x, y]) => s.toScreen(x, y));
    ctx.beginPath();
    pts.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.closePath();
    ctx.fillStyle = "rgba(80, 80, 80, 0.10)";
    ctx.fill();
    ctx.setLineDash([5, 3]);
    ctx.strokeStyle = "#222";
    ctx.lineWidth = 1.5;
    ctx.stroke();
  };

  s.clearSelection = () => {
    // also when the box was sent but the app has not answered yet (the header does not carry it then)
    if (s.sent || (s.data && s.data.header.selection)) s.setState("selection", null);
    s.sent = false;
    if (s.data) s.data.header.selection = null;
    s.drawOverlay([]);
  };

  const local = (e) => {
    const b = overlay.getBoundingClientRect();
    return [e.clientX - b.left, e.clientY - b.top];
  };
  overlay.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [px, py] = local(e), f = Math.exp(-e.deltaY * 0.0015);
    const k = Math.min(Math.max(s.k * f, s.k0 / 4), s.k0 * 4096);
    s.tx = px - ((px - s.tx) * k) / s.k;
    s.ty = py - ((py - s.ty) * k) / s.k;
    s.k = k;
    s.touched = true;
    s.draw();
  }, { passive: false });
  overlay.addEventListener("pointerdown", (e) => {
    overlay.focus();
    overlay.setPointerCapture(e.pointerId);
    const p = local(e);
    const mode = e.shiftKey ? "box" : s.mode;
    s.drag = { mode, start: p, path: [p], moved: false, tx: s.tx, ty: s.ty };
    tip.style.display = "none";
  });
  overlay.addEventListener("pointermove", (e) => {
    const p = local(e), g = s.drag;
    if (!g) return s.hover(p);
    if (Math.hypot(p[0] - g.start[0], p[1] - g.start[1]) > 3) g.moved = true;
    if (g.mode === "pan") {
      s.touched = true;
      s.tx = g.tx + p[0] - g.start[0];
      s.ty = g.ty + p[1] - g.start[1];
      s.draw();
    } else if (g.mode === "box") {
      const [x0, y0] = g.start;
      s.drawOverlay([[x0, y0], [p[0], y0], p, [x0, p[1]]]);
    } else {
      const q = g.path[g.path.length - 1];
      if (Math.hypot(p[0] - q[0], p[1] - q[1]) >= 3) g.path.push(p);
      s.drawOverlay(g.path);
    }
  });
  overlay.addEventListener("pointerup", (e) => {
    const g = s.drag, p = local(e);
    s.drag = null;
    if (!g) return;
    if (!g.moved) {
      // The second press of a double-click (which fits the view) is no click; a click is sent after
      // CLICK_WAIT_MS unless a double-click cancels it. Every click goes with the last ones (each with its
      // nonce), so one that lands before the app has read the previous is not lost.
      if (e.detail > 1) return;
      const i = s.nearest(...p), d = s.data;
      if (i < 0) return;
      clearTimeout(s.clickTimer);
      s.clickTimer = setTimeout(() => {
        s.clicks = s.clicks.concat([{ branch: d.branch[i], position: d.position[i], nonce: Math.random() }]);
        s.clicks = s.clicks.slice(-CLICKS_KEPT);
        s.setState("click", { clicks: s.clicks, view: d.header.view });
      }, CLICK_WAIT_MS);
      return;
    }
    if (g.mode === "pan") return;
    let shape = g.mode === "box" ? [g.start, [p[0], g.start[1]], p, [g.start[0], p[1]]] : g.path;
    if (shape.length > MAX_LASSO) {
      const step = shape.length / MAX_LASSO;
      shape = Array.from({ length: MAX_LASSO }, (_, j) => shape[Math.floor(j * step)]);
    }
    if (shape.length < 3) return s.drawOverlay([]);
    const poly = shape.map(([x, y]) => s.toGrid(x, y).map((v) => Math.round(v * 10) / 10));
    s.sent = true;
    s.setState("selection", { kind: g.mode, polygon: poly, view: s.data.header.view });
  });
  overlay.addEventListener("dblclick", () => { clearTimeout(s.clickTimer); s.fitView(); s.draw(); });
  overlay.addEventListener("keydown", (e) => { if (e.key === "Escape") s.clearSelection(); });
  overlay.addEventListener("pointerleave", () => { tip.style.display = "none"; });

  // The text around point i, as dashboard.text.contexts writes it ("…before[token]after…"), read from the
  // points themselves: (branch, position) -> row, built on the first hover of a blob; a position before
  // its branch's fork is read from the parent (header.tree: [branch, parent, fork position]).
  s.context = (i) => {
    const d = s.data, vocab = d.header.vocab;
    if (!d.at) {
      d.at = new Map();
      for (let j = 0; j < d.header.n; j++) d.at.set(d.branch[j] * 1048576 + d.position[j], j);
      d.up = new Map((d.header.tree || []).map(([b, parent, fork]) => [b, [parent, fork]]));
    }
    const text = (b, p) => {
      for (let hops = 0; hops < 4096 && b >= 0; hops++) {
        const j = d.at.get(b * 1048576 + p);
        if (j !== undefined) return vocab[d.tok[j]];
        const up = d.up.get(b);
        if (!up || p >= up[1]) return "";
        b = up[0];
      }
      return "";
    };
    const [before, after] = d.header.context || [8, 4];
    let left = "", right = "";
    for (let k = before; k >= 1; k--) left += text(d.branch[i], d.position[i] - k);
    for (let k = 1; k <= after; k++) right += text(d.branch[i], d.position[i] + k);
    return `…${left}[${vocab[d.tok[i]]}]${right}…`;
  };

  let pending = null;
  s.hover = (p) => {
    if (pending) { pending = p; return; }
    pending = p;
    requestAnimationFrame(() => {
      const q = pending;
      pending = null;
      const i = s.nearest(...q), d = s.data;
      if (i < 0) { tip.style.display = "none"; return; }
      tip.textContent = `${s.context(i)}\nbranch ${d.branch[i]} · position ${d.position[i]}`;
      tip.style.display = "block"; // laid out first, so its width is known: it stays inside the panel
      tip.style.left = Math.max(0, Math.min(q[0] + 12, s.size()[0] - tip.offsetWidth - 4)) + "px";
      tip.style.top = q[1] + 12 + "px";
    });
  };

  s.resize = new ResizeObserver(() => {
    if (!s.data) return;
    // Refit on a real change of layout (first layout, panels stacked or side by side), not when a scrollbar
    // comes or goes: the points must stay under the cursor between two clicks.
    const [w, h] = s.size(), f = s.fitted || [0, 0];
    if (!s.touched && (Math.abs(w - f[0]) > 0.2 * f[0] || Math.abs(h - f[1]) > 0.2 * f[1])) s.fitView();
    s.k0 = Math.min(s.size()[0] / s.data.header.grid[0], s.size()[1] / s.data.header.grid[1]) * 0.92;
    s.draw();
  }).observe(stage);
  return s;
}

export default function (component) {
  const { data, setStateValue, parentElement } = component;
  let s = parentElement.__branchlens;
  if (!s) {
    s = setup(parentElement);
    parentElement.__branchlens = s;
  }
  s.setState = setStateValue;
  // Streamlit calls the last function returned when the panel is unmounted (another view is another key):
  // free the GPU context and the arrays then, or each view change would keep both panels' behind.
  const cleanup = () => {
    if (s.resize) s.resize.disconnect();
    clearTimeout(s.clickTimer);
    const lose = s.gl && s.gl.getExtension("WEBGL_lose_context");
    if (lose) lose.loseContext();
    s.data = null;
    delete parentElement.__branchlens;
  };
  if (!s.gl || !data) return cleanup;
  const d = decode(data);
  const fresh = !s.data || s.data.header.view !== d.header.view;
  s.data = d;
  s.stage.style.height = d.header.height + "px";
  s.overlay.setAttribute("aria-label", d.header.label || "scatter");
  s.stage.dataset.points = String(d.header.n);
  s.stage.dataset.chosen = String(d.header.n_chosen);
  s.upload();
  s.buildIndex();
  if (fresh) s.fitView();
  s.k0 = Math.min(s.size()[0] / d.header.grid[0], s.size()[1] / d.header.grid[1]) * 0.92;
  if (!d.header.selection) s.sent = false;
  s.draw();
  return cleanup;
}
