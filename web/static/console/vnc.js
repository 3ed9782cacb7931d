// The VNC console: noVNC's RFB client on the proxy's own WebSocket.
import RFB from '/novnc/core/rfb.js';
import { page, pageToken, setStatus, websocketUrl } from '/console/common.js';

const screen = document.getElementById('screen');
const cad = document.getElementById('cad');
const reconnect = document.getElementById('reconnect');

function connect() {
    const token = pageToken();
    if (!token) {
        setStatus('error', 'no token: open this page as /vnc.html#token=<token>');
        return;
    }
    setStatus('connecting');
    reconnect.disabled = true;
    let rfb;
    try {
        rfb = new RFB(screen, websocketUrl(token), { wsProtocols: ['binary'] });
    } catch (e) {
        setStatus('error', String(e));
        reconnect.disabled = false;
        return;
    }
    page.rfb = rfb;
    rfb.scaleViewport = true;
    rfb.resizeSession = false;
    rfb.focusOnClick = true;
    rfb.addEventListener('connect', () => {
        setStatus('connected');
        cad.disabled = false;
        rfb.focus();
    });
    rfb.addEventListener('disconnect', (e) => {
        setStatus('disconnected', e.detail.clean ? '' : 'connection lost or refused');
        cad.disabled = true;
        reconnect.disabled = false;
    });
    rfb.addEventListener('securityfailure', (e) => {
        setStatus('error', e.detail.reason || 'security failure');
    });
    rfb.addEventListener('credentialsrequired', () => {
        // The proxy answers the console's own authentication; a tenant is
        // never asked for credentials.
        setStatus('error', 'the console asked for credentials');
        rfb.disconnect();
    });
    rfb.addEventListener('desktopname', (e) => {
        document.title = `${e.detail.name} (VNC)`;
    });
}

cad.addEventListener('click', () => page.rfb && page.rfb.sendCtrlAltDel());
reconnect.addEventListener('click', connect);
connect();
