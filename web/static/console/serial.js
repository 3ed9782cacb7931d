// The serial console: xterm.js bridged to a binary WebSocket. Bytes from
// the console go to the terminal as they are; keys typed go back as UTF-8.
import { Terminal } from '/xterm/lib/xterm.mjs';
import { page, pageToken, setStatus, websocketUrl } from '/console/common.js';

const term = new Terminal({
    convertEol: false,
    cursorBlink: true,
    scrollback: 5000,
    fontFamily: 'monospace',
});
page.term = term;
// 80x24: a serial line carries no window size, so the guest assumes this.
term.open(document.getElementById('terminal'));

const reconnect = document.getElementById('reconnect');
const encoder = new TextEncoder();
let socket = null;

function send(bytes) {
    if (socket && socket.readyState === WebSocket.OPEN) {
        socket.send(bytes);
    }
}

term.onData((data) => send(encoder.encode(data)));
// Keys xterm.js reports as raw bytes (e.g. some Alt combinations).
term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));

function connect() {
    const token = pageToken();
    if (!token) {
        setStatus('error', 'no token: open this page as /serial.html#token=<token>');
        return;
    }
    setStatus('connecting');
    reconnect.disabled = true;
    const ws = new WebSocket(websocketUrl(token), ['binary']);
    ws.binaryType = 'arraybuffer';
    socket = ws;
    ws.addEventListener('open', () => {
        setStatus('connected');
        term.focus();
    });
    ws.addEventListener('message', (e) => {
        if (e.data instanceof ArrayBuffer) {
            term.write(new Uint8Array(e.data));
        }
    });
    ws.addEventListener('close', (e) => {
        socket = null;
        setStatus('disconnected', e.reason || (e.wasClean ? '' : 'connection lost or refused'));
        reconnect.disabled = false;
    });
}

reconnect.addEventListener('click', connect);
connect();
