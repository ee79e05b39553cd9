import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unigrpo.models.tiny import TinyConfig, TinyUnifiedModel

torch.set_num_threads(2)
COL={"red":(220,40,40),"green":(40,200,60),"blue":(50,90,230),"yellow":(230,210,40)}
SH=["circle","square","triangle"]
W=["<pad>","<bos>","<eos>","<think>","</think>","a","two"]+list(COL)+SH
class Tok:
    pad_id=0; bos_id=1; eos_id=2; think_id=3; end_think_id=4; vocab_size=len(W)
    def encode(self,s): return [W.index(w) for w in s.split()]
def draw(img, shape, col, cx, cy, r):
    yy,xx=np.mgrid[0:32,0:32]+0.5
    if shape=="circle": m=(xx-cx)**2+(yy-cy)**2<=r*r
    elif shape=="square": m=(abs(xx-cx)<=r*0.85)&(abs(yy-cy)<=r*0.85)
    else: m=(yy>=cy-r)&(yy<=cy+r)&(abs(xx-cx)<=(yy-(cy-r))/2)
    img[m]=COL[col]
def sample(rng,B):
    imgs=np.zeros((B,32,32,3),np.uint8); prompts=[]
    for i in range(B):
        n=rng.integers(1,3); s=SH[rng.integers(3)]; c=list(COL)[rng.integers(4)]
        if n==1: draw(imgs[i],s,c,rng.uniform(10,22),rng.uniform(10,22),rng.uniform(4,6)); prompts.append(f"a {c} {s}")
        else:
            y=rng.uniform(10,22); draw(imgs[i],s,c,rng.uniform(7,9),y,4.5); draw(imgs[i],s,c,rng.uniform(23,25),y,4.5); prompts.append(f"two {c} {s}")
    return torch.tensor(imgs).permute(0,3,1,2).float()/255, prompts
ch=tuple(int(x) for x in sys.argv[1].split(",")); mins=float(sys.argv[2])
torch.manual_seed(0); m=TinyUnifiedModel(TinyConfig(vocab_size=len(W),unet_channels=ch),Tok())
opt=torch.optim.AdamW(m.parameters(),1e-3); rng=np.random.default_rng(0); t0=time.time(); step=0
while time.time()-t0<mins*60:
    x,p=sample(rng,64); tok=m.encode(p); _,ctx=m.forward_context(tok)
    x0=m.encode_images(x); eps=torch.randn_like(x0); t=torch.rand(64); tt=t[:,None,None,None]
    v=m.velocity((1-tt)*x0+tt*eps,t,ctx); loss=F.mse_loss(v,eps-x0)
    opt.zero_grad(); loss.backward(); opt.step(); step+=1
    if step%100==0: print(step, f"{time.time()-t0:.0f}s", float(loss), flush=True)
m.eval()
ps=[f"a {c} {s}" for c in COL for s in SH]+[f"two {c} {s}" for c in COL for s in SH]
with torch.no_grad():
    _,ctx=m.forward_context(m.encode(ps*2)); g_=torch.Generator().manual_seed(0); x=torch.randn(len(ps)*2,*m.latent_shape,generator=g_); ts=torch.linspace(1,0,21); ts=3*ts/(1+2*ts)
    for k in range(20): x=x+(ts[k+1]-ts[k])*m.velocity(x,ts[k].expand(x.shape[0]),ctx)
    x=m.decode(x)
g=x.view(4,12,3,32,32).permute(0,3,1,4,2).reshape(4*32,12*32,3)
Image.fromarray((g.numpy()*255).astype(np.uint8)).resize((12*32*3,4*32*3),Image.NEAREST).save(f"/tmp/probe/grid_{sys.argv[1]}.png")
print("steps",step)
