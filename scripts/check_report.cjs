// Opens a report HTML file in headless Chromium (Playwright driving Debian's chromium)
// and checks that it renders with no console error, no page error and no network
// request; writes a screenshot of its top (FULL=1: the whole page). Usage: node check_report.cjs REPORT.html SHOT.png
const { chromium } = require('playwright-core');
const { pathToFileURL } = require('node:url');

(async () => {

const [html, shot] = process.argv.slice(2);
const page_url = pathToFileURL(html).href;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
const problems = [];
const requests = [];
page.on('console', m => { if (m.type() === 'error' || m.type() === 'warning') problems.push(`console ${m.type()}: ${m.text()}`); });
page.on('pageerror', e => problems.push(`page error: ${e.message}`));
page.on('request', r => { if (r.url() !== page_url) requests.push(r.url()); });
page.on('requestfailed', r => problems.push(`request failed: ${r.url()}`));
await page.goto(page_url, { waitUntil: 'load' });
const stats = await page.evaluate(() => ({
  figures: document.querySelectorAll('figure svg').length,
  tables: document.querySelectorAll('table').length,
  heading: document.querySelector('h1')?.textContent ?? '',
  width: document.documentElement.scrollWidth,
}));
// The first 2400 pixels: the page as a reader first sees it (the whole page with FULL=1).
if (shot) await page.screenshot({ path: shot, fullPage: true, clip: process.env.FULL === '1' ? undefined : { x: 0, y: 0, width: 1200, height: 2400 } });
await browser.close();
console.log(JSON.stringify({ ...stats, requests, problems }));
if (problems.length || requests.length || stats.figures === 0) process.exit(1);
})();
