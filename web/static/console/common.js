// Shared by the console pages: the token from the page URL, the WebSocket
// URL of this same origin, and the status line.
//
// The token is read from the fragment (`#token=...`, or `#<token>`), which
// the browser never sends to any server, or else from the query
// (`?token=...`). It leaves the browser only on the console's own WebSocket
// (`/websockify?token=...`, same origin), whose query the proxy never logs.

export function pageToken() {
    const hash = location.hash.replace(/^#/, '');
    if (hash) {
        const fromHash = new URLSearchParams(hash).get('token');
        if (fromHash) {
            return fromHash;
        }
        if (!hash.includes('=')) {
            return decodeURIComponent(hash);
        }
    }
    return new URLSearchParams(location.search).get('token') || '';
}

export function websocketUrl(token) {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${scheme}//${location.host}/websockify?token=${encodeURIComponent(token)}`;
}

// window.consolegate is what the page exposes: its state for people
// (the status line) and for tests (state, detail, and the console object).
export const page = {
    state: 'loading',
    detail: '',
};
window.consolegate = page;

export function setStatus(state, detail) {
    page.state = state;
    page.detail = detail || '';
    const el = document.getElementById('status');
    if (el) {
        el.textContent = detail ? `${state}: ${detail}` : state;
        el.dataset.state = state;
    }
}
